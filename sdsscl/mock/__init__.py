"""A realistic mock SDSS survey in the authors' HDF5 format (the embedded default data).

>>> from sdsscl.mock import generate_mock, summarize_mock
>>> generate_mock("runs/default/mock.h5", n=20000, seed=2021, workers=2)  # doctest: +SKIP
"""
from .population import CONTAMINANTS, MockPhysics, draw_population
from .reference import fit_reference_seds, load_reference_catalog
from .summary import reference_stats, summarize_mock
from .survey import FORMAT, generate_mock

__all__ = ["CONTAMINANTS", "FORMAT", "MockPhysics", "draw_population", "fit_reference_seds",
           "generate_mock", "load_reference_catalog", "reference_stats", "summarize_mock"]
