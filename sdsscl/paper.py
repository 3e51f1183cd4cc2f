"""What Hayat et al. (2021) report, as data, so every chapter can put it beside the mock's.

Only numbers and statements printed in the paper's text are here, each with the section
and figure it comes from; nothing is read off a plot.
"""
from __future__ import annotations

from dataclasses import dataclass

CITATION = ("Hayat, Stein, Harrington, Lukić & Mustafa (2021), Self-Supervised Representation "
            "Learning for Astronomical Images, ApJL 911, L33")


@dataclass(frozen=True)
class Claim:
    """One result of the paper.

    key: short name used in the book.
    statement: the result, in the paper's words as far as possible.
    section: where the paper states it.
    figures: the paper figures that show it.
    chapter: the book chapter (document name) that reproduces it on the mock.
    """

    key: str
    statement: str
    section: str
    figures: tuple[int, ...]
    chapter: str


#: "Few labels" in the morphology claim: the label counts up to which the linear probe and the
#: fine-tuned encoder must beat the supervised CNN (the paper's 256 and 1,024 points, Figure 3).
FEW_LABELS = 1024

CLAIMS: tuple[Claim, ...] = (
    Claim("datasets",
          "517,190 spec-z labelled and 845,254 unlabelled SDSS DR12 galaxies with dereddened Petrosian "
          "r <= 17.8, as 107x107-pixel ugriz cutouts; the labelled set is biased to nearby bright galaxies "
          "with low extinction",
          "Appendix A; Section 4", (6,), "notebooks/01-data"),
    Claim("augmentations",
          "Gaussian noise is the strongest augmentation and PSF smoothing the weakest; the best "
          "representations come from all augmentations except PSF",
          "Section 2; Appendix D", (13,), "notebooks/08-ablation"),
    Claim("representation_space",
          "A 2-d UMAP of the 2048-d representations groups galaxies by visual similarity, GZ2 morphology "
          "and spectroscopic redshift; a UMAP of the pixels separates mainly by size and brightness; "
          "representations stay put under augmentations while pixel-space positions move",
          "Section 3.1; Appendix B.2, B.3", (2, 8, 9, 10), "notebooks/04-representation-space"),
    Claim("morphology",
          "A linear classifier on the representations and the fine-tuned encoder far outperform a "
          "supervised CNN with few labels; the supervised network needs roughly 16 times more labels to "
          "match the fine-tuned one on the first GZ2 question",
          "Section 3.2; Appendix C", (3, 11, 12), "notebooks/05-morphology"),
    Claim("photoz",
          "Fine-tuned representations beat the supervised network in sigma_MAD and eta at every fraction "
          "of training labels, worth 2-4 times more spec-z labels, and set a new state of the art for "
          "CNN photo-z on SDSS",
          "Section 3.3", (4, 5), "notebooks/06-photoz"),
    Claim("similarity_search",
          "A cosine-similarity search in representation space returns visually similar galaxies, "
          "agnostic to rotation and jitter",
          "Appendix B.1", (7,), "notebooks/07-similarity-search"),
)


@dataclass(frozen=True)
class DatasetNumbers:
    """Sizes and cuts of the paper's SDSS data (Appendix A, Section 3.2, Appendix C.1)."""

    labelled_query: int = 547_224          # spec-z query result
    labelled: int = 517_190                # after removing duplicates
    labelled_train_photoz: int = 400_000   # photo-z training images
    labelled_val_photoz: int = 103_000     # photo-z validation images
    unlabelled: int = 845_254
    r_petro_max: float = 17.8              # dereddened Petrosian r limit, both sets
    z_spec_max: float = 0.4                # spectroscopic redshift limit of the labelled set
    z_phot_max_unlabelled: float = 0.8     # Beck et al. (2016) photo-z cut on the unlabelled set
    gz2_total: int = 304_122               # galaxies classified by GZ2 (Section 3.2)
    gz2_matched: int = 183_929             # GZ2 galaxies matched to the paper's images (Appendix C.1)
    cutout_pixels: int = 107
    cutout_arcsec: float = 25.3            # Appendix C.3: "our images span 25.3 arcseconds"


DATASET = DatasetNumbers()
