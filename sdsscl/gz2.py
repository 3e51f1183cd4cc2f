"""The part of the Galaxy Zoo 2 decision tree the paper uses, as data.

Willett et al. (2013); Hart et al. (2016, Fig. 2) draw the whole tree. The paper
(Section 3.2, Appendix C) predicts three binary questions:

* ``smooth``: "Is the galaxy simply smooth and rounded, with no sign of a disk?"
  (smooth / features or disk / star or artifact; the last is neglected as a class)
* ``edge_on``: "Could this be a disk viewed edge-on?", asked only of volunteers who
  answered *features or disk*;
* ``bar``: "Is there a sign of a bar feature through the centre of the galaxy?", asked
  only of volunteers who answered *no* to ``edge_on``.

In the HDF5 files, ``gz2/<question>/votes`` holds the vote counts ``(N, n_answers)`` in
the order of :attr:`Question.answers` and ``gz2/<question>/fraction`` the vote
fractions (NaN where nobody was asked).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Question:
    """One GZ2 question.

    name: short key used in files and APIs.
    text: the question as volunteers read it.
    answers: possible answers, in the column order of the vote arrays.
    positive: the answer whose fraction is the binary label P predicted in the paper.
    negative: the answer it is contrasted with (other answers are ignored in P).
    parent: ``(question, answer)`` a volunteer must have given to be asked this, or None.
    """

    name: str
    text: str
    answers: tuple[str, ...]
    positive: str
    negative: str
    parent: tuple[str, str] | None = None

    def column(self, answer: str) -> int:
        """Column index of ``answer`` in this question's vote array."""
        try:
            return self.answers.index(answer)
        except ValueError:
            raise KeyError(f"GZ2 question {self.name!r} has no answer {answer!r}; "
                           f"answers are {self.answers}") from None

    def binary_fraction(self, votes: np.ndarray) -> np.ndarray:
        """P = n_positive / (n_positive + n_negative) from a ``(N, n_answers)`` vote array.

        NaN where neither answer received a vote.
        """
        votes = np.asarray(votes, dtype=np.float64)
        pos = votes[..., self.column(self.positive)]
        neg = votes[..., self.column(self.negative)]
        total = pos + neg
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, pos / total, np.nan)

    def binary_count(self, votes: np.ndarray) -> np.ndarray:
        """Number of votes for the two answers P is built from."""
        votes = np.asarray(votes)
        return votes[..., self.column(self.positive)] + votes[..., self.column(self.negative)]


SMOOTH = Question(
    name="smooth",
    text="Is the galaxy simply smooth and rounded, with no sign of a disk?",
    answers=("smooth", "features_or_disk", "star_or_artifact"),
    positive="smooth",
    negative="features_or_disk",
)
EDGE_ON = Question(
    name="edge_on",
    text="Could this be a disk viewed edge-on?",
    answers=("yes", "no"),
    positive="yes",
    negative="no",
    parent=("smooth", "features_or_disk"),
)
BAR = Question(
    name="bar",
    text="Is there a sign of a bar feature through the centre of the galaxy?",
    answers=("yes", "no"),
    positive="yes",
    negative="no",
    parent=("edge_on", "no"),
)

#: The questions in tree order: a question's parent always comes before it.
TREE: tuple[Question, ...] = (SMOOTH, EDGE_ON, BAR)
QUESTIONS: dict[str, Question] = {q.name: q for q in TREE}


def question(name: str) -> Question:
    """Look a question up by name, with an error listing the valid names."""
    try:
        return QUESTIONS[name]
    except KeyError:
        raise KeyError(f"unknown GZ2 question {name!r}; known questions: {sorted(QUESTIONS)}") from None
