"""A pybtex style for the book's bibliography: ``unsrt`` with optional titles.

The paper's reference list (ApJ style) prints no titles for journal articles, and the
book's ``references.bib`` holds only what the paper prints; plain ``unsrt`` would reject
those entries.
"""
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as Unsrt
from pybtex.style.template import optional


class PaperStyle(Unsrt):
    def format_title(self, e, which_field, as_sentence=True):
        return optional[super().format_title(e, which_field, as_sentence)]


def setup(app):
    register_plugin("pybtex.style.formatting", "paper", PaperStyle)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
