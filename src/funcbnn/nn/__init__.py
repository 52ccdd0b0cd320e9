"""Object-style VI: ``BayesianModule`` and per-parameter variational posteriors, over the functional core.

For people who think in ``nn.Module`` s (the surface of torchbayesian and
deepuq), with the core's scaling, explicit randomness and batched samples::

    model = BayesianModule(net, posterior="pretrained_gaussian", prior=("gaussian", {"std": 0.1}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)      # the variational parameters
    for x, y in loader:
        opt.zero_grad()
        loss, nll, kl = model.elbo(x, y, num_data=len(dataset))
        loss.backward()
        opt.step()
    summary = predict_vi_uq(model, x_test, n_samples=64, apply_softmax=True)

The wrapped module is never modified: its trainable parameters are copied into
one :class:`VariationalPosterior` each (looked up by name in :data:`POSTERIORS`),
its buffers into the adapter, and the forward runs the module's code as a pure
function of a weight draw (:func:`funcbnn.functionalize`). Priors come from
:data:`funcbnn.priors.PRIORS`. Both registries take new entries with a
decorator, like torchbayesian's ``PosteriorFactory`` / ``PriorFactory``.
"""

from .module import BayesianModule
from .posteriors import (
    DEFAULT_INIT_STD,
    POSTERIORS,
    GaussianPosterior,
    PretrainedGaussianPosterior,
    VariationalPosterior,
)
from .seed_style import BayesByBackpropMLP, BayesianLinear, predict_vi_uq, vi_elbo_step

__all__ = [
    "POSTERIORS",
    "DEFAULT_INIT_STD",
    "VariationalPosterior",
    "GaussianPosterior",
    "PretrainedGaussianPosterior",
    "BayesianModule",
    "BayesianLinear",
    "BayesByBackpropMLP",
    "predict_vi_uq",
    "vi_elbo_step",
]
