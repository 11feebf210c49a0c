"""Kubernetes operator for MoEDeployment: keeps expert placement near optimal, rolls it out
safely through a ConfigMap. Layers: ``spec``/``nodes``/``loadsource``/``kube`` (typed models
and API clients), ``build`` and ``status`` (pure decisions, manifests, the status projection),
``runtime`` (shared state, one pass's context), ``observe`` -> ``decide`` -> ``act`` (the
steps of one pass; ``events`` de-duplicates its Events), ``reconcile`` (their order),
``handlers`` (thin kopf glue), ``__main__`` (entry point)."""
