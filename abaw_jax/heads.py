"""The three Aff-Wild2 label heads in one table: output width, column names, how each is scored,
filled between predicted frames and written to / checked in a submission file.

Plain numpy (no jax, no matplotlib): the submission checker, the metrics and the plots read it,
and so can data-loader workers. One record per head (`HEADS`); what differs between heads is the
kind of label, so each kind is a subclass and the callers never branch on head names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np

from abaw_jax import metrics
from abaw_jax.data.affwild2 import AU_NAMES, EXPR_NAMES
from abaw_jax.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class Head:
    """One label head; subclasses implement the kind-specific parts."""

    name: str  # va | expr | au
    columns: tuple[str, ...]  # one name per model output, as in the submission header
    score: str  # key of the headline metric in `metrics()`
    # How frames without a prediction (no face crop) are filled: linear interpolation suits
    # continuous outputs; class/AU probabilities take the nearest predicted frame.
    interpolate: bool
    kind: ClassVar[str] = ""  # regression | classes | binary
    challenge_score: ClassVar[str] = ""  # key of the headline metric in `challenge()`

    @property
    def size(self) -> int:
        """Model output width."""
        return len(self.columns)

    @property
    def header(self) -> str:
        """First line of every submission file of this head."""
        return "image_location," + ",".join(self.columns)

    def metrics(self, pred: np.ndarray, target: np.ndarray,
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        """This head's metrics over the given (valid) frames; `thresholds`: AU only."""
        raise NotImplementedError

    def constant_baseline(self, target: np.ndarray) -> float:
        """The head's score for the best constant prediction on these labels: what a model
        must clearly beat to have learnt anything."""
        raise NotImplementedError

    def submitted(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                  ) -> np.ndarray:
        """The numbers a submission line holds, one row per row of per-frame outputs: what the
        challenge scores."""
        raise NotImplementedError

    def format_values(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                      ) -> list[str]:
        """The values part of each submission line, one per row of per-frame outputs."""
        raise NotImplementedError

    def challenge(self, submitted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        """The challenge's metrics of submitted values (`submitted`) on the given (valid)
        frames, as the organisers compute them from the files."""
        raise NotImplementedError

    def line_problem(self, fields: list[str]) -> str | None:
        """What is wrong with the values of one submission line (the fields after the image
        name), None when they are valid."""
        try:
            return self._value_problem(fields)
        except ValueError:
            return "not a number"

    def _value_problem(self, fields: list[str]) -> str | None:
        raise NotImplementedError

    def selection_score(self, pred: np.ndarray, target: np.ndarray) -> float:
        """The validation score that picks the temporal smoothing."""
        return float(self.metrics(pred, target)[self.score])

    def search_thresholds(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray | None:
        """Decision thresholds fitted on these frames; None for heads that use none."""
        return None

    def combine(self, members: np.ndarray, thresholds: np.ndarray | float = 0.5
                ) -> np.ndarray:
        """An ensemble's prediction from its members' post-processed outputs (m, n, size):
        values whose `submitted(values)` (at 0.5) is the ensemble's answer."""
        raise NotImplementedError


class Regression(Head):
    """Values in [-1, 1] (valence, arousal), scored by CCC."""

    kind = "regression"

    def metrics(self, pred: np.ndarray, target: np.ndarray,
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.va_metrics(pred, target)

    def constant_baseline(self, target: np.ndarray) -> float:
        return 0.0  # a constant has no covariance with the labels: CCC 0

    challenge_score = "ccc_mean"

    def submitted(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                  ) -> np.ndarray:
        # The file's text read back: np.round(x, 4) differs from it at ties (0.12345 gives
        # 0.1234, the text 0.1235). 1.5-3 s per million frames on the 2-core machine.
        lines = self.format_values(values)
        return np.array(",".join(lines).split(",") if lines else [],
                        np.float64).reshape(len(lines), self.size)

    def format_values(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                      ) -> list[str]:
        return [",".join(f"{v:.4f}" for v in row) for row in np.clip(values, -1, 1)]

    def challenge(self, submitted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        return metrics.va_metrics(submitted, target)

    def combine(self, members: np.ndarray, thresholds: np.ndarray | float = 0.5
                ) -> np.ndarray:
        """The members' mean."""
        return np.mean(np.asarray(members, np.float64), 0)

    def _value_problem(self, fields: list[str]) -> str | None:
        values = [float(f) for f in fields]
        if len(values) != self.size or not all(-1 <= v <= 1 for v in values):
            return f"expected {','.join(self.columns)} in [-1, 1]"
        return None


class Classes(Head):
    """One class per frame out of `columns`, scored by macro F1; files hold the class index."""

    kind = "classes"

    def metrics(self, pred: np.ndarray, target: np.ndarray,
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.expr_metrics(pred, target)

    def constant_baseline(self, target: np.ndarray) -> float:
        """The best single class predicted for every frame."""
        return max(float(metrics.f1_per_class(np.full(len(target), c), target, self.size).mean())
                   for c in range(self.size))

    challenge_score = "f1_macro"

    def submitted(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                  ) -> np.ndarray:
        return np.argmax(values, -1)

    def format_values(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                      ) -> list[str]:
        return [str(int(c)) for c in self.submitted(values)]

    def challenge(self, submitted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        per_class = metrics.f1_per_class(submitted, target, self.size)
        return {"f1_macro": float(per_class.mean()), "f1_per_class": per_class.tolist()}

    def combine(self, members: np.ndarray, thresholds: np.ndarray | float = 0.5
                ) -> np.ndarray:
        """Majority vote of the members' classes (the ABAW6 Netease ensemble's), a tie going
        to the tied class of highest mean probability; one-hot of the voted class."""
        members = np.asarray(members, np.float64)
        votes = np.eye(self.size)[np.argmax(members, -1)].sum(0)
        tied = votes == votes.max(-1, keepdims=True)
        return np.eye(self.size)[np.argmax(np.where(tied, members.mean(0), -np.inf), -1)]

    def _value_problem(self, fields: list[str]) -> str | None:
        if len(fields) != 1 or int(fields[0]) not in range(self.size):
            return f"expected one class in 0..{self.size - 1}"
        return None


class Binary(Head):
    """Independent 0/1 labels (action units), scored by mean F1; probabilities are
    thresholded (0.5, or per-column thresholds searched on validation)."""

    kind = "binary"

    def metrics(self, pred: np.ndarray, target: np.ndarray,
                thresholds: np.ndarray | None = None) -> dict[str, Any]:
        return metrics.au_metrics(pred, target, thresholds)

    def constant_baseline(self, target: np.ndarray) -> float:
        # all-inactive scores F1 0, so all-active is the better constant of each column
        return float(np.mean([metrics.binary_f1(np.ones(len(t), bool), t) for t in target.T]))

    challenge_score = "f1_mean"

    def submitted(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                  ) -> np.ndarray:
        return (values >= np.asarray(thresholds)).astype(int)

    def format_values(self, values: np.ndarray, thresholds: np.ndarray | float = 0.5
                      ) -> list[str]:
        return [",".join(map(str, row)) for row in self.submitted(values, thresholds)]

    def challenge(self, submitted: np.ndarray, target: np.ndarray) -> dict[str, Any]:
        f1 = metrics.au_f1(submitted, target)  # 0/1 values: active at the default 0.5
        return {"f1_mean": float(f1.mean()), "f1_per_au": metrics.by_au(f1)}

    def _value_problem(self, fields: list[str]) -> str | None:
        if len(fields) != self.size or any(int(f) not in (0, 1) for f in fields):
            return f"expected {self.size} values 0/1"
        return None

    def selection_score(self, pred: np.ndarray, target: np.ndarray) -> float:
        # Thresholds are searched after the smoothing, so a smoothing is judged at the
        # thresholds it would get (mean F1 at 0.5 would favour shifting the probabilities).
        return float(metrics.au_f1(pred, target, self.search_thresholds(pred, target)).mean())

    def search_thresholds(self, pred: np.ndarray, target: np.ndarray) -> np.ndarray:
        return metrics.search_thresholds(pred, target)

    def combine(self, members: np.ndarray, thresholds: np.ndarray | float = 0.5
                ) -> np.ndarray:
        """Majority vote of the members' 0/1 decisions at `thresholds`; a tie (an even number
        of members) is decided by the mean probability at the thresholds. 0/1 values."""
        members = np.asarray(members, np.float64)
        votes = 2 * (members >= np.asarray(thresholds)).sum(0)
        tie = members.mean(0) >= np.asarray(thresholds)
        return np.where(votes == len(members), tie, votes > len(members)).astype(np.float64)


HEADS: dict[str, Head] = {
    "va": Regression("va", ("valence", "arousal"), "ccc_mean", interpolate=True),
    "expr": Classes("expr", EXPR_NAMES, "f1_macro", interpolate=False),
    "au": Binary("au", AU_NAMES, "f1_mean_thresholded", interpolate=False),
}


def get(name: str) -> Head:
    if name not in HEADS:
        raise UnknownNameError(f"unknown head {name!r}; known heads: {sorted(HEADS)}")
    return HEADS[name]


# A multi-branch model (GCSA's audio-visual one) predicts each head once per branch: its
# outputs and predictions are named "<head>.<branch>" beside the head's own (their fusion).
BRANCH_SEP = "."


def branch_output(head: str, branch: str) -> str:
    """The name of one branch's output of a head ("expr.audio")."""
    return f"{head}{BRANCH_SEP}{branch}"


def head_of(name: str) -> str:
    """The head of an output name ("expr" of "expr" and of "expr.audio")."""
    return name.split(BRANCH_SEP, 1)[0]


def branches(names, head: str) -> list[str]:
    """The branches (sorted) of `head` among output names: ["audio", "visual"] of "expr.audio",
    "expr.visual"."""
    prefix = f"{head}{BRANCH_SEP}"
    return sorted(n[len(prefix):] for n in names if n.startswith(prefix))


# The valence/arousal quadrant of each expression class, by Russell's circumplex model of
# affect: the coarse groups of the coarse-fine loss (losses.coarse_fine, `loss.expr_quadrants`
# replaces this default). Quadrants (0-based; the GCSA paper's E1..E4): 0 = v>0, a>0;
# 1 = v<0, a>0; 2 = v<0, a<0; 3 = v>0, a<0. Neutral is placed in 3: calm, the nearest region of
# the low-arousal pleasant quadrant. Other is no one expression (in Aff-Wild2 mostly faces the
# annotators did not call one of the six); it goes with Neutral, so that confusing the two
# catch-all classes is not a coarse error.
_EXPR_QUADRANTS = {"Happiness": 0, "Surprise": 0, "Anger": 1, "Disgust": 1, "Fear": 1,
                   "Sadness": 2, "Neutral": 3, "Other": 3}
EXPR_QUADRANT: tuple[int, ...] = tuple(_EXPR_QUADRANTS[n] for n in EXPR_NAMES)
