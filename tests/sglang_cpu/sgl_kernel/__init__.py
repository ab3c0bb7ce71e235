"""A stand-in for SGLang's CPU kernel library, for the CPU tests only (SGLang's
CPU kernels are not published as a wheel). Every name imports; calling one
raises, and SGLang then takes its native torch paths. It lives under tests/ so
that nothing ghostserve installs can shadow the real library on a GPU node;
ghostserve.integrations.sglang_run.cpu_env puts it on PYTHONPATH when asked."""


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: SGLang's CPU kernel library is not installed")

    missing.__name__ = name
    return missing
