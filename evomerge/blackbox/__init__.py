"""Black-box merging: merges of models whose weights users cannot touch.

- :mod:`evomerge.blackbox.pool`: the provider's LoRA pool (base + PEFT adapters) merged
  from a control vector (per adapter sparsity alpha and signed scale beta);
- :mod:`evomerge.blackbox.pool_server`: that pool behind an HTTP API (``evomerge
  serve-pool``), sessions over hosted tasks or uploaded examples, token auth and limits.

The provider side only: it sits above :mod:`evomerge.fitness` (it scores hosted tasks with
the HF backend). The clients that talk to it (:mod:`evomerge.fitness.backends.pool_client`,
:mod:`evomerge.fitness.backends.mixture_decoder`) live with the fitness backends, so
``fitness`` never imports ``blackbox``.

Submodules are imported on demand (the server pulls in FastAPI, the pool pulls in torch).
"""
