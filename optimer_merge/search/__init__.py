"""`optimer-merge search`: Bayesian optimisation of merge weights over a pool of distribution vectors."""

from optimer_merge.search.config import SearchConfig, VectorSource, load_search_config
from optimer_merge.search.runner import SearchError, search

__all__ = ["SearchConfig", "SearchError", "VectorSource", "load_search_config", "search"]
