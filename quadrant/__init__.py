"""quadrant: load, serve, quantise and train large language models on CPU and GPU."""

__version__ = "0.1.0"

from quadrant.sampling_params import SamplingParams  # noqa: E402


def __getattr__(name: str):
    # LLM and AsyncLLM pull in torch and the model code: import them only when asked for.
    if name == "LLM":
        from quadrant.engine.engine import LLM

        return LLM
    if name == "AsyncLLM":
        from quadrant.engine.async_engine import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'quadrant' has no attribute {name!r}")


__all__ = ["LLM", "AsyncLLM", "SamplingParams", "__version__"]
