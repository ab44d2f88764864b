"""What the tests of both layers' ``InexactDerivativeWarning`` share."""
import warnings

from optlayers import InexactDerivativeWarning


def inexact_warnings(run) -> list[str]:
    """The texts of the ``InexactDerivativeWarning``s that ``run()`` gives, every one recorded."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught if issubclass(w.category, InexactDerivativeWarning)]
