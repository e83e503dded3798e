"""quadrant: load, serve, quantise and train large language models on CPU and GPU."""

__version__ = "0.1.0"

from quadrant.sampling_params import SamplingParams  # noqa: E402

__all__ = ["SamplingParams", "__version__"]
