"""EnsembleAttributor: average an attributor's contributions over independently seeded runs."""
from __future__ import annotations

import numbers

import numpy as np
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval
from sklearn.utils.validation import check_is_fitted

from .base import BaseAttributor

__all__ = ["EnsembleAttributor"]


class EnsembleAttributor(BaseAttributor):
    """Mean contribution matrix of ``n_estimators`` runs that differ only in their seed.

    A network's training run is one draw from a distribution: the initial weights and
    the batch order come from the seed, and with them the trajectory and every
    trajectory-based score (HYDRA, TracIn) and every score taken at the trained weights
    (influence functions). ``EnsembleAttributor`` fits ``n_estimators`` clones of
    ``attributor`` with independent seeds drawn from ``random_state`` and returns the
    mean of their ``C`` matrices, an estimate of the expected contribution over
    training runs; the seed-to-seed part of each score averages out (its variance falls
    as ``1 / n_estimators``). It keeps the attributor contract: ``C[i, j]`` estimates
    ``E[loss_j(trained without i) - loss_j(trained with all)]`` over the seed. It is a
    :class:`~hydrattr.BaseAttributor` whose training is its members' fits: the same
    ``fit``/``attribute`` checks, and the members validate the data themselves.

    This is what ensembles of models do for TRAK (Park et al., 2023); for cleaning label
    noise it is the counterpart of confident learning's K-fold training.

    Parameters
    ----------
    attributor : BaseAttributor
        The attributor to repeat (e.g. ``HydraAttributor(net)``); it must have a
        ``random_state`` parameter, which each member gets set to its own seed. It is
        cloned, never fitted itself.
    n_estimators : int, default=5
        Number of independently seeded members.
    random_state : int, RandomState instance or None, default=None
        Draws the members' seeds (``seeds_``). With ``None`` the members are unseeded.
    verbose : int, default=0
        Show a progress bar over the members during ``fit`` and ``attribute``.

    Attributes
    ----------
    estimators_ : list of BaseAttributor
        The fitted members. Memory is ``n_estimators`` times one member's: with HYDRA's
        fast mode at scale, give the member ``storage="half"`` or ``"memmap"`` (many
        test columns), or ``storage="replay", trajectory="memmap"`` (a few, as for
        :class:`~hydrattr.cleaning.LabelNoiseCleaner`'s one mean column).
    seeds_ : ndarray of shape (n_estimators,) or None
        The members' ``random_state``.
    n_train_ : int
        Number of training samples.
    trained_mask_ : ndarray of bool of shape (n_train,)
        Rows that entered a gradient step in every member (``train_split`` rows do not).
    n_features_in_ : int
        Number of features of flat training inputs (as the members record it).

    Examples
    --------
    >>> from hydrattr import EnsembleAttributor, HydraAttributor
    >>> ens = EnsembleAttributor(HydraAttributor(net), n_estimators=5,
    ...                          random_state=0)  # doctest: +SKIP
    >>> C = ens.fit(X, y).attribute(X_test, y_test)  # doctest: +SKIP
    """

    _parameter_constraints = {
        "attributor": [HasMethods(["fit", "attribute", "get_params", "set_params"])],
        "n_estimators": [Interval(numbers.Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(self, attributor, n_estimators=5, random_state=None, verbose=0):
        self.attributor = attributor
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.verbose = verbose

    _fitted_attribute = "estimators_"

    @property
    def net(self):
        """The member attributor's ``net`` (read-only; samplers look at its train_split)."""
        return getattr(self.attributor, "net", None)

    def _check_params(self):
        self._refuse_bools("n_estimators")
        if "random_state" not in self.attributor.get_params(deep=False):
            raise TypeError(f"attributor must have a random_state parameter to seed its "
                            f"members, got {type(self.attributor).__name__}.")

    # each member validates, checks and converts the data itself
    def _validate_xy(self, X, y, reset):
        return X, y

    def _test_inputs(self, X_test, y_test):
        return X_test, y_test

    def _bar(self, desc, total):
        progress = self._progress()
        return None if progress is None else progress(total=total, desc=desc)

    def _fit_net(self, X, y):
        """Training is fitting ``n_estimators`` clones of ``attributor``, each with its
        own seed."""
        if self.random_state is None:
            seeds = None
        else:
            rs = check_random_state(self.random_state)
            seeds = rs.randint(np.iinfo(np.int32).max, size=int(self.n_estimators))
        members = []
        bar = self._bar("ensemble fit", int(self.n_estimators))
        for k in range(int(self.n_estimators)):
            seed = None if seeds is None else int(seeds[k])
            members.append(clone(self.attributor).set_params(random_state=seed).fit(X, y))
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        self.estimators_ = members
        self.seeds_ = seeds
        self.n_train_ = int(members[0].n_train_)
        masks = [np.asarray(getattr(m, "trained_mask_", np.ones(self.n_train_, bool)), bool)
                 for m in members]
        self.trained_mask_ = np.logical_and.reduce(masks)
        if hasattr(members[0], "n_features_in_"):
            self.n_features_in_ = members[0].n_features_in_

    def _attribute(self, X_test, y_test, objective):
        """``mean_k C_k`` over the members; positive = helpful on average over runs."""
        total = None
        for C in self._member_attributions(X_test, y_test, objective):
            total = C if total is None else total + C
        return total / len(self.estimators_)

    def _member_attributions(self, X_test, y_test, objective):
        """Each fitted member's ``C`` (float64), one at a time, with the progress bar."""
        bar = self._bar("ensemble attribute", len(self.estimators_))
        for m in self.estimators_:
            yield np.asarray(m.attribute(X_test, y_test, objective=objective),
                             dtype=np.float64)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()

    def attribute_std(self, X_test, y_test, objective="per_sample"):
        """Standard error of the ensemble mean, elementwise (``std_k C_k / sqrt(K)``).

        Needs ``n_estimators >= 2``. Use it to see which contributions are told apart from
        zero by the ensemble and which are within seed-to-seed noise.

        Returns
        -------
        se : ndarray of the shape of :meth:`attribute`'s result
        """
        check_is_fitted(self, "estimators_")
        K = len(self.estimators_)
        if K < 2:
            raise ValueError(f"attribute_std needs n_estimators >= 2, got {K}.")
        Cs = list(self._member_attributions(X_test, y_test, objective))
        return np.std(Cs, axis=0, ddof=1) / np.sqrt(K)
