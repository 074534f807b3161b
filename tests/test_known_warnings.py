"""Known-harmless warnings are filtered by message, category AND module; anything else (the same text from our
own code, or a privacy warning) still shows."""

from __future__ import annotations

import warnings

import pytest

from fedshield.known_warnings import KNOWN_HARMLESS, ignore_known_harmless
from fedshield.privacy.accounting import epsilon

# A very small spend: the RDP bound's best order is its largest alpha, so Opacus warns.
TINY = [(50.0, 0.01, 3)]


def _shown(message: str, category: type[Warning], module: str) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ignore_known_harmless()
        warnings.warn_explicit(message, category, filename=f"{module}.py", lineno=1, module=module)
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("known", KNOWN_HARMLESS, ids=lambda k: k.module)
def test_each_known_warning_is_hidden_only_where_it_arises(known) -> None:  # type: ignore[no-untyped-def]
    text = {  # the real texts, as the libraries write them
        "FutureWarning": "Tip: In future versions of Ray, Ray will no longer override accelerator visible devices env "
                         "var if num_gpus=0 or num_gpus=None (default).",
        "DeprecationWarning": "GitWildMatchPattern ('gitwildmatch') is deprecated. Use 'gitignore' for "
                              "GitIgnoreBasicPattern or GitIgnoreSpecPattern instead.",
        "UserWarning": "Full backward hook is firing when gradients are computed with respect to module outputs "
                       "since no inputs require gradients.",
    }[known.category.__name__]
    module = {"FutureWarning": "ray._private.worker", "DeprecationWarning": "pathspec.patterns.gitwildmatch",
              "UserWarning": "torch.utils.hooks"}[known.category.__name__]
    assert _shown(text, known.category, module) == []
    assert _shown(text, known.category, "fedshield.privacy.dpsgd") == [text]  # same words, our code: shown
    assert _shown(text, RuntimeWarning, module) == [text]  # another category: shown


def test_privacy_warnings_are_never_in_the_list() -> None:
    for known in KNOWN_HARMLESS:
        assert not any(word in known.message.lower() for word in ("privacy", "epsilon", "dp", "secure", "noise"))
    assert _shown("Secure RNG turned off.", UserWarning, "opacus.privacy_engine") == ["Secure RNG turned off."]


def test_opacus_largest_alpha_is_quiet_under_prv_and_shown_under_rdp() -> None:
    """Under PRV the RDP bound only sizes the accountant's mesh; under RDP it IS the reported epsilon."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        epsilon(TINY, delta=1e-5, accountant="prv")
        prv = [str(w.message) for w in seen]
        epsilon([(50.0, 0.01, 4)], delta=1e-5, accountant="rdp")
        rdp = [str(w.message) for w in seen][len(prv):]
    assert not any("Optimal order" in m for m in prv), prv
    assert any(m.startswith("Optimal order is the largest alpha") for m in rdp), rdp
