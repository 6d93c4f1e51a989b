"""`xfast study`: train the arms of a sentence-embedding study and compare them in one report.

After *On the Language Encoder of Contrastive Cross-modal Models* (Zhao et al., 2024): each arm
is a contrastive objective ({CLIP, CyCLIP} on images, {CLAP, CyCLAP} on audio) with no, unsupervised
or supervised SimCSE training of the text tower. `run_study` trains every (arm, seed) in its
own folder (resumable), evaluates all of them on the same held-out data and writes the report.
"""
from xfast.study.arms import GRID, Arm, parse_arms
from xfast.study.runner import StudyPlan, run_study

__all__ = ["GRID", "Arm", "StudyPlan", "parse_arms", "run_study"]
