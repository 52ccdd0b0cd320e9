"""funcbnn: functional Bayesian neural networks on ``torch.func``.

Take any ``nn.Module``, pull its weights out as a pytree, put a posterior over
them and predict with many weight samples in one batched call::

    apply_fn, params, buffers = funcbnn.functionalize(net)
    post = funcbnn.families.diag_gaussian(init_std=1e-2)
    state = post.init(params)
    samples = post.sample(state, 64, generator=torch.Generator().manual_seed(0))
    outputs = funcbnn.sample_outputs(apply_fn, samples, x)      # (64, N, C)
    summary = funcbnn.summarize(outputs, "classification")
"""

import warnings as _warnings

with _warnings.catch_warnings():
    # torch.func's first import warns when NumPy is absent; funcbnn never uses NumPy.
    _warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    from . import checks, ensemble, families, laplace, likelihoods, mc_dropout, metrics, priors, swag, tree, vi
    from .families import FAMILIES, DiagGaussianState, diag_gaussian
    from .likelihoods import LIKELIHOODS
    from .model import Functional, FunctionalModel, Inputs, functionalize
    from .predict import PredictiveSummary, VmapFallbackWarning, sample_outputs, summarize
    from .nn import BayesianModule
    from .priors import PRIORS

__version__ = "0.1.0"

__all__ = [
    "checks",
    "ensemble",
    "families",
    "laplace",
    "likelihoods",
    "mc_dropout",
    "metrics",
    "swag",
    "vi",
    "BayesianModule",
    "LIKELIHOODS",
    "priors",
    "tree",
    "FAMILIES",
    "PRIORS",
    "DiagGaussianState",
    "diag_gaussian",
    "Functional",
    "FunctionalModel",
    "Inputs",
    "functionalize",
    "PredictiveSummary",
    "VmapFallbackWarning",
    "sample_outputs",
    "summarize",
    "__version__",
]
