"""Distribution vectors v_i = theta_i - theta_base: ``extract`` writes them as safetensors, ``stats``
measures norms and cosines, ``checks`` says what makes checkpoints vectors of one base. The
search's resident pool lives in ``optimer_merge.search.pool``."""

from optimer_merge.vectors.checks import MANIFEST, VectorError, read_manifest
from optimer_merge.vectors.extract import extract
from optimer_merge.vectors.stats import stats

__all__ = ["MANIFEST", "VectorError", "extract", "read_manifest", "stats"]
