"""Engine integrations. Each module imports its engine; import only the one you run.

* :mod:`ghostserve.integrations.vllm`: ``GhostServeConnector``, a vLLM KV connector
  (``kv_connector_module_path``), and :func:`~ghostserve.integrations.vllm.resume_request`
  for front ends that resubmit requests after an engine died.
* :mod:`ghostserve.integrations.sglang`: the SGLang plug-in (entry point in the
  ``sglang.srt.plugins`` group; imports SGLang only when ``GHOSTSERVE_SGLANG=1``).
* :mod:`ghostserve.integrations.vllm_run`, :mod:`~ghostserve.integrations.sglang_run`,
  :mod:`~ghostserve.integrations.testmodels`: harnesses for tests and benchmarks.
"""
