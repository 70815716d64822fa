"""The advisor: a recommended LoRA config with the evidence for each choice (`advise`), and the
evidence itself as data (`evidence.toml`, read by `load_evidence`)."""

from lora_core.advisor.advice import PRIORITIES, Advice, AdviceError, Alternative, Case, Choice, Training
from lora_core.advisor.advise import advise
from lora_core.advisor.evidence import READS, TASKS, Claim, Evidence, EvidenceError, load_evidence
from lora_core.advisor.figures import Figure, numbers_in, show

__all__ = [
    "PRIORITIES",
    "READS",
    "TASKS",
    "Advice",
    "AdviceError",
    "Alternative",
    "Case",
    "Choice",
    "Claim",
    "Evidence",
    "EvidenceError",
    "Figure",
    "Training",
    "advise",
    "load_evidence",
    "numbers_in",
    "show",
]
