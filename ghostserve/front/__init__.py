"""The OpenAI-compatible front (``ghostserve front``) and ``ghostserve vllm``:
API clients' requests survive engine failures. Needs the ``front`` extra
(aiohttp); :mod:`ghostserve.front.config` and :mod:`ghostserve.front.cli`
import only the standard library, so the CLI parser builds without it."""
