"""Reports made from a run directory alone (never from live objects): the Pareto front of
any run, old ones included, and the self-contained HTML report (``evomerge report RUN``)."""
