"""SAEs spliced into a TransformerLens model, with the method names of SAELens's HookedSAETransformer.

:class:`SplicedModel` wraps a TransformerLens ``TransformerBridge`` from
:func:`saesweep.activations.models.load_model`. It offers SAELens v6's ``add_sae``,
``reset_saes``, ``saes``, ``run_with_saes``, ``run_with_cache_with_saes`` and
``run_with_hooks_with_saes``::

    spliced = SplicedModel(model)
    logits = spliced.run_with_saes(tokens, saes=[sae])
    logits, cache = spliced.run_with_cache_with_saes(tokens, saes=[sae])
    latents = cache["blocks.5.hook_resid_pre.hook_sae_acts_post"]

An SAE replaces the activation at its hookpoint (``sae.cfg.hook_name``) with its reconstruction
through a permanent forward hook on the model's own ``HookPoint``. Every forward pass of the model
goes through it, direct calls to ``model`` included, until ``reset_saes`` removes it.
``model.reset_hooks()`` leaves permanent hooks in place.

Each spliced SAE has its own hook points, named ``<hook_name>.<name>`` as in SAELens 6.54
(``sae_lens/saes/sae.py``):

- ``hook_sae_input``: the activation that the SAE encodes;
- ``hook_sae_acts_post``: the latent activations, ``sae.encode`` of that input;
- ``hook_sae_recons``: the reconstruction, ``sae.decode`` of the latents;
- ``hook_sae_error``: the activation minus the reconstruction the SAE makes without hooks;
- ``hook_sae_output``: what flows on into the model.

Unlike SAELens, ``hook_sae_recons`` is on the activation's own scale (a saved SAE has its input
normalization folded in, so the two agree there), and ``hook_sae_error`` fires with or without
``use_error_term``. There is no ``hook_sae_acts_pre``, because the gated architecture computes its
latents without a single pre-activation.

With ``use_error_term=True`` the output is the reconstruction plus the error, which equals the
clean activation up to float rounding. The cache still shows the SAE's latents, and a hook that
edits ``hook_sae_acts_post`` changes the output by exactly the change it makes to the
reconstruction. The error term is computed under ``torch.no_grad``, as in SAELens, so gradients
reach earlier activations only through the SAE.

``splice_mask`` ([batch, pos] bool) limits the replacement to the positions where it is True;
the other positions keep the clean activation and a zero error. SAELens does the same for special
tokens (``HookedSAETransformer.add_sae(exclude_special_tokens=...)``). The SAE's hook points
still see every position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from saesweep.saes import SAE

if TYPE_CHECKING:
    # Imported where used, so that importing saesweep.evaluation costs no TransformerLens import.
    from transformer_lens.ActivationCache import ActivationCache
    from transformer_lens.hook_points import HookPoint, LensHandle

SAE_HOOK_NAMES: tuple[str, ...] = (
    "hook_sae_input",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
"""Hook points of every spliced SAE, each named ``<hook_name>.<name>``."""

NamesFilter = str | Sequence[str] | Callable[[str], bool] | None
HookList = Sequence[tuple[str | Callable[[str], bool], Callable[..., Any]]]


def model_hook_point(model: Any, hook_name: str) -> HookPoint:
    """Return the ``HookPoint`` of ``model`` named ``hook_name`` (an alias such as
    ``blocks.5.hook_resid_pre`` or the bridge's own name), raising ``ValueError`` if absent.

    ``model.hooks`` and ``run_with_hooks`` skip unknown names without an error, so every splice
    checks the name here first.
    """
    hook_point = model.hook_dict.get(hook_name)
    if hook_point is None:
        raise ValueError(
            f"Hookpoint {hook_name!r} does not exist in this model. Use a key of model.hook_dict, "
            f"such as blocks.0.hook_resid_pre with a block index below {model.cfg.n_layers}."
        )
    return hook_point


def sae_hook_name(sae: SAE) -> str:
    """Return `sae.cfg.hook_name`, raising ValueError when the SAE does not name its hookpoint."""
    if not sae.cfg.hook_name:
        raise ValueError(
            "An SAE to splice needs cfg.hook_name, the hookpoint it reconstructs. "
            "Set it in the SAEConfig, e.g. hook_name='blocks.5.hook_resid_pre'."
        )
    return sae.cfg.hook_name


def _add_temporary_hook(hook_point: HookPoint, hook_fn: Callable[..., Any]) -> LensHandle:
    """Add a forward hook and return its handle, so that exactly this hook can be removed."""
    hook_point.add_hook(hook_fn, dir="fwd")
    return hook_point.fwd_hooks[-1]


def _remove_hook(hook_point: HookPoint, handle: LensHandle) -> None:
    handle.hook.remove()
    hook_point.fwd_hooks = [other for other in hook_point.fwd_hooks if other is not handle]


def _name_matcher(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if callable(names_filter):
        return names_filter
    names = set(names_filter)
    return lambda name: name in names


class _SpliceSite:
    """One SAE spliced at one hookpoint: the replacement hook and the SAE's own hook points."""

    def __init__(self, sae: SAE, hook_name: str, hook_point: HookPoint, use_error_term: bool):
        from transformer_lens.hook_points import HookPoint

        self.sae = sae
        self.hook_name = hook_name
        self.hook_point = hook_point
        self.use_error_term = use_error_term
        self.splice_mask: torch.Tensor | None = None
        self.hook_points: dict[str, HookPoint] = {}
        for local_name in SAE_HOOK_NAMES:
            point = HookPoint()
            point.name = f"{hook_name}.{local_name}"
            self.hook_points[local_name] = point
        self._handle: LensHandle | None = None

    def attach(self) -> None:
        # prepend=True runs the SAE before every hook added to this point without prepend, so
        # caches and hooks there see the activation that flows on into the model.
        self.hook_point.add_hook(self.splice, is_permanent=True, prepend=True)
        self._handle = self.hook_point.fwd_hooks[0]

    def detach(self) -> None:
        if self._handle is not None:
            _remove_hook(self.hook_point, self._handle)
            self._handle = None

    def _hooked_before_output(self) -> bool:
        names = ("hook_sae_input", "hook_sae_acts_post", "hook_sae_recons")
        return any(self.hook_points[name].has_hooks(dir="fwd") for name in names)

    def _position_mask(self, activation: torch.Tensor) -> torch.Tensor | None:
        mask = self.splice_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(activation.shape[:2]):
            raise ValueError(
                f"splice_mask has shape {tuple(mask.shape)}, but the activation at {self.hook_name} "
                f"has shape {tuple(activation.shape)}. Pass a [batch, pos] mask of the tokens "
                "being run."
            )
        mask = mask.to(device=self.sae.device, dtype=torch.bool)
        return mask.reshape(*mask.shape, *([1] * (activation.dim() - 2)))

    def splice(self, activation: torch.Tensor, *, hook: Any) -> torch.Tensor:
        sae = self.sae
        if activation.shape[-1] != sae.cfg.d_in:
            raise ValueError(
                f"The SAE spliced at {self.hook_name} has d_in={sae.cfg.d_in}, but the activation "
                f"there has shape {tuple(activation.shape)}. Splice an SAE trained on this hookpoint."
            )
        points = self.hook_points
        x = activation.to(device=sae.device, dtype=sae.dtype)
        mask = self._position_mask(activation)

        sae_in = points["hook_sae_input"](x)
        latents = points["hook_sae_acts_post"](sae.encode(sae_in))
        reconstruction = points["hook_sae_recons"](sae.decode(latents))

        with torch.no_grad():
            # The error is measured against the SAE's own reconstruction of the activation, so
            # that edits made by hooks on the latents pass through to the output.
            clean = sae.decode(sae.encode(x)) if self._hooked_before_output() else reconstruction
            error = x - clean
            if mask is not None:
                error = torch.where(mask, error, torch.zeros_like(error))
            error = points["hook_sae_error"](error)

        output = reconstruction + error if self.use_error_term else reconstruction
        if mask is not None:
            output = torch.where(mask, output, x)
        output = points["hook_sae_output"](output)
        return output.to(device=activation.device, dtype=activation.dtype)


class SplicedModel:
    """A TransformerLens model with SAEs spliced in at their hookpoints, SAELens style.

    The SAEs stay attached to ``model`` itself until ``reset_saes``; this object keeps track of
    them. Use one ``SplicedModel`` per model: two of them that splice the same hookpoint apply
    both SAEs, one after the other.
    """

    def __init__(self, model: Any):
        self.model = model
        self._sites: dict[str, _SpliceSite] = {}

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """Hook name -> the SAE spliced there."""
        return {name: site.sae for name, site in self._sites.items()}

    @property
    def sae_hook_points(self) -> dict[str, HookPoint]:
        """``<hook_name>.<sae hook>`` -> hook point, for every spliced SAE."""
        return {point.name: point for site in self._sites.values() for point in site.hook_points.values()}

    # attaching --------------------------------------------------------------------------

    def add_sae(self, sae: SAE, use_error_term: bool = False) -> None:
        """Splice ``sae`` in at ``sae.cfg.hook_name`` until it is removed by ``reset_saes``.

        An SAE already spliced at that hookpoint is replaced.
        """
        hook_name = sae_hook_name(sae)
        hook_point = model_hook_point(self.model, hook_name)
        for name, site in self._sites.items():
            if site.hook_point is hook_point and name != hook_name:
                raise ValueError(
                    f"Hookpoint {hook_name!r} is the same point as {name!r}, where an SAE is "
                    f"already spliced. Call reset_saes({name!r}) first."
                )
        if hook_name in self._sites:
            self._sites.pop(hook_name).detach()
        site = _SpliceSite(sae, hook_name, hook_point, use_error_term)
        site.attach()
        self._sites[hook_name] = site

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Remove the SAEs spliced at ``act_names`` (hook names), or every SAE when None."""
        if act_names is None:
            names = list(self._sites)
        elif isinstance(act_names, str):
            names = [act_names]
        else:
            names = list(act_names)
        unknown = [name for name in names if name not in self._sites]
        if unknown:
            raise ValueError(
                f"No SAE is spliced at {unknown}. Spliced hookpoints: {sorted(self._sites)}."
            )
        for name in names:
            self._sites.pop(name).detach()

    @contextmanager
    def saes(
        self, saes: SAE | Sequence[SAE] = (), *, use_error_term: bool = False, reset_saes_end: bool = True
    ) -> Iterator[SplicedModel]:
        """Splice ``saes`` in for the body of a ``with`` block.

        On exit, even after an exception, the SAEs it added are removed and any SAE they
        replaced is spliced back, unless ``reset_saes_end`` is False.
        """
        if isinstance(saes, SAE):
            saes = [saes]
        replaced: list[tuple[str, _SpliceSite | None]] = []
        try:
            for sae in saes:
                hook_name = sae_hook_name(sae)
                replaced.append((hook_name, self._sites.get(hook_name)))
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                self._restore(replaced)

    def _restore(self, replaced: list[tuple[str, _SpliceSite | None]]) -> None:
        for hook_name, previous in reversed(replaced):
            site = self._sites.pop(hook_name, None)
            if site is not None:
                site.detach()
            if previous is not None:
                previous.attach()
                self._sites[hook_name] = previous

    @contextmanager
    def _masked(self, splice_mask: torch.Tensor | None) -> Iterator[None]:
        """Limit every spliced SAE to the True positions of ``splice_mask`` for one call."""
        sites = list(self._sites.values())
        for site in sites:
            site.splice_mask = splice_mask
        try:
            yield
        finally:
            for site in sites:
                site.splice_mask = None

    # running ----------------------------------------------------------------------------

    def __call__(self, *model_args: Any, splice_mask: torch.Tensor | None = None, **model_kwargs: Any) -> Any:
        """Run the model with the spliced SAEs, replacing only where ``splice_mask`` is True."""
        with self._masked(splice_mask):
            return self.model(*model_args, **model_kwargs)

    def run_with_saes(
        self,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        use_error_term: bool = False,
        splice_mask: torch.Tensor | None = None,
        reset_saes_end: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model once with ``saes`` spliced in, then remove them."""
        with self.saes(saes, use_error_term=use_error_term, reset_saes_end=reset_saes_end):
            return self(*model_args, splice_mask=splice_mask, **model_kwargs)

    def run_with_cache_with_saes(
        self,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        use_error_term: bool = False,
        splice_mask: torch.Tensor | None = None,
        names_filter: NamesFilter = None,
        return_cache_object: bool = True,
        remove_batch_dim: bool = False,
        reset_saes_end: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache | dict[str, torch.Tensor]]:
        """Run ``model.run_with_cache`` with ``saes`` spliced in, then remove them.

        The cache contains the model's activations and, for every spliced SAE, the entries
        ``<hook_name>.hook_sae_*`` that ``names_filter`` selects. The model's entry at the
        hookpoint itself is what flows on, equal to ``hook_sae_output``.
        """
        for option in ("pos_slice", "incl_bwd"):
            if kwargs.get(option):
                raise ValueError(
                    f"run_with_cache_with_saes does not support {option}. Slice the returned "
                    "cache, or call model.run_with_cache inside `with spliced.saes([...])`."
                )
        matches = _name_matcher(names_filter)
        cache_device = kwargs.get("device")
        with self.saes(saes, use_error_term=use_error_term, reset_saes_end=reset_saes_end):
            sae_cache: dict[str, torch.Tensor] = {}
            added: list[tuple[HookPoint, LensHandle]] = []

            def store(activation: torch.Tensor, *, hook: HookPoint) -> torch.Tensor:
                sae_cache[hook.name] = activation.detach().to(cache_device)
                return activation

            try:
                for name, point in self.sae_hook_points.items():
                    if matches(name):
                        added.append((point, _add_temporary_hook(point, store)))
                with self._masked(splice_mask):
                    output, cache = self.model.run_with_cache(
                        *model_args, names_filter=names_filter, return_cache_object=False, **kwargs
                    )
            finally:
                for point, handle in added:
                    _remove_hook(point, handle)
        cache.update(sae_cache)
        if return_cache_object:
            from transformer_lens.ActivationCache import ActivationCache

            activation_cache = ActivationCache(cache, self.model, has_batch_dim=True)
            if remove_batch_dim:
                activation_cache.remove_batch_dim()
            return output, activation_cache
        if remove_batch_dim:
            cache = {
                key: value[0] if isinstance(value, torch.Tensor) and value.size(0) == 1 else value
                for key, value in cache.items()
            }
        return output, cache

    def run_with_hooks_with_saes(
        self,
        *model_args: Any,
        saes: SAE | Sequence[SAE] = (),
        fwd_hooks: HookList = (),
        use_error_term: bool = False,
        splice_mask: torch.Tensor | None = None,
        reset_saes_end: bool = True,
        **model_kwargs: Any,
    ) -> Any:
        """Run the model with ``saes`` spliced in and forward hooks on model or SAE hook points.

        A hook named ``<hook_name>.hook_sae_*`` goes on that SAE's hook point. A filter function
        is tried on the SAE hook names too. Every other hook goes to ``model.run_with_hooks``.
        """
        with self.saes(saes, use_error_term=use_error_term, reset_saes_end=reset_saes_end):
            sae_points = self.sae_hook_points
            model_hooks = []
            added: list[tuple[HookPoint, LensHandle]] = []
            try:
                for name_or_filter, hook_fn in fwd_hooks:
                    if isinstance(name_or_filter, str):
                        if name_or_filter in sae_points:
                            point = sae_points[name_or_filter]
                            added.append((point, _add_temporary_hook(point, hook_fn)))
                        else:
                            model_hook_point(self.model, name_or_filter)
                            model_hooks.append((name_or_filter, hook_fn))
                        continue
                    for name, point in sae_points.items():
                        if name_or_filter(name):
                            added.append((point, _add_temporary_hook(point, hook_fn)))
                    model_hooks.append((name_or_filter, hook_fn))
                with self._masked(splice_mask):
                    return self.model.run_with_hooks(*model_args, fwd_hooks=model_hooks, **model_kwargs)
            finally:
                for point, handle in added:
                    _remove_hook(point, handle)
