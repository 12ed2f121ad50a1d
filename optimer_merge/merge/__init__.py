"""The OptiMer merge: the rule (``rule``), the mergekit method (``mergekit_method``), its
registration at interpreter start (``hook``), and recipes (``recipes``). Importing this package
imports nothing heavy: the startup hook lives here."""
