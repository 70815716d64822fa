"""The seed article's rules of thumb as data and checks: rank bands, alpha/r ratios, dropout vs rank."""

from __future__ import annotations

from lora_core.settings import LoraSettings, scale_formula

# Article, "Empirical Guidelines for Rank Selection".
RANK_BANDS: tuple[tuple[int, int, str], ...] = (
    (4, 8, "simple tasks, classification"),
    (16, 32, "sweet spot: instruction tuning, domain adaptation"),
    (64, 128, "complex tasks, multilingual, abundant data"),
    (256, 256, "rarely necessary: consider full fine-tuning"),
)
# Article, "The Alpha-to-Rank Ratio": alpha = r/2, r, 2r are the common choices.
COMMON_SCALE_RANGE = (0.5, 2.0)
UNUSUAL_SCALE_RANGE = (0.25, 4.0)


def rank_band(r: int) -> str:
    """The article's guideline band for rank `r`, or a note that it lies between bands."""
    for low, high, label in RANK_BANDS:
        if low <= r <= high or (high == 256 and r >= 256):
            return label
    return "between the article's bands"


def alpha_advice(settings: LoraSettings) -> str | None:
    """A warning when the effective scale (alpha/r, or alpha/sqrt(r) with rsLoRA) is unusual, else None."""
    scale = settings.scaling()
    low, high = UNUSUAL_SCALE_RANGE
    kind = scale_formula(settings.use_rslora)
    if scale > high:
        return (
            f"{kind} = {scale:.2f} is unusually high: the LoRA branch outweighs its usual size; "
            "expect instability unless the learning rate is lowered (the article's common range is 0.5-2)"
        )
    if scale < low:
        return (
            f"{kind} = {scale:.2f} is unusually low: updates will be damped; "
            "the article's common range is 0.5-2 (alpha = r/2 to 2r)"
        )
    return None


def dropout_advice(r: int, dropout: float) -> str | None:
    """A note for a low rank with dropout, where the article's advice rests on its own formula.

    The article reasons that dropout bites hardest on low ranks (only r(1-p) of r components active
    per step), which holds for B Dropout(A x). PEFT drops the layer's input instead
    (`lora_B(lora_A(dropout(x)))`), so all r components stay active; the Dropout page's study
    measures what dropout does to held-out loss at each rank and data size."""
    active = r * (1 - dropout)
    if dropout > 0 and (r <= 4 or active < 4):
        return (
            f"with r={r} and dropout {dropout:g}, the article counts only {active:.1f} of {r} rank components "
            f"active and advises dropout 0, but PEFT drops input features (B A Dropout(x)): all {r} components "
            "stay active. Whether dropout helps depends on your data size: see the dropout study on the Dropout page"
        )
    return None
