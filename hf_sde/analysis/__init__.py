"""What fitted heads say about paths: text scores, simulation, the analysis report, per-token display."""

from .report import build_report
from .scoring import TextScore, fit_ou_baseline, score_texts
from .simulate import BaselineSDE, simulate
from .tokens import token_pieces

__all__ = ["BaselineSDE", "TextScore", "build_report", "fit_ou_baseline", "score_texts", "simulate", "token_pieces"]
