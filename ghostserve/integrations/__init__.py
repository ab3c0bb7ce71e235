"""Engine integrations. Each module imports its engine; import only the one you run.

* :mod:`ghostserve.integrations.vllm`: ``GhostServeConnector``, a vLLM KV connector
  (``kv_connector_module_path``), and :func:`~ghostserve.integrations.vllm.resume_request`
  for front ends that resubmit requests after an engine died.
"""
