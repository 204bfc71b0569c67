"""The "Why" chain of ``docs/reproduction.md``: each conclusion follows its numbers and says when one is missing.

Two result sets that point opposite ways must give opposite sentences; no numbers must give "not measured".
"""

from __future__ import annotations

from typing import Any

from programs.reproduce.conclusions import why
from programs.reproduce.plan import DOMAIN_SETS, GENERIC_DOMAIN, PAPER, ReproPlan, default_variants, extended_variants

Row = dict[str, Any]


def _plan() -> ReproPlan:
    extra = [v for v in extended_variants() if v.name in ("gated", "unseen-pairs")]
    return ReproPlan(variants=[*default_variants(), *extra])


def _results(paper: float, mean: float, gated: float) -> list[Row]:
    return [{"dataset": ds, "task": "zeroshot", "metric": "top1", "mode": "best", "memory": GENERIC_DOMAIN,
             "variant": variant, "split": "test", "k": 10, "k_infer": 10, "value": value, "std": 0.0, "seeds": [0],
             "per_seed": {"0": value}}
            for ds in DOMAIN_SETS for variant, value in ((PAPER, paper), ("mean-fusion", mean), ("gated", gated))]


def _meta(*, seen: float, unseen: float, attention: float, prompt: float, image: float, unseen_loss: float
          ) -> dict[str, Any]:
    overfit = [{"images": "train (seen by the base)", "n": 1000, "i2t_r@1": seen},
               {"images": "test (unseen)", "n": 1000, "i2t_r@1": unseen},
               {"images": "val half for unseen-pairs", "n": 500, "i2t_r@1": unseen}]
    att = [{"memory": GENERIC_DOMAIN, "queries": f"{ds} test images", "neighbour_attention": attention}
           for ds in DOMAIN_SETS] + [{"memory": GENERIC_DOMAIN, "queries": "flickr8k test captions",
                                      "neighbour_attention": attention}]
    purity = [{"dataset": ds, "k": 10, "image_uni_search": image, "image_cross_search": 0.01,
               "prompt_uni_search": prompt, "prompt_cross_search": 0.02} for ds in DOMAIN_SETS]
    training = [{"variant": PAPER, "seed": 0, "pairs": 30000, "final_loss": 8.0},
                {"variant": "unseen-pairs", "seed": 0, "pairs": 2500, "final_loss": unseen_loss}]
    return {"diagnostics": {"base_overfit": overfit, "attention_by_variant": {PAPER: att}, "purity": purity},
            "training": training}


def _steps(lines: list[str]) -> dict[str, str]:
    return {line[0]: line for line in lines if line[:2] in {f"{i}." for i in range(1, 7)}}


def test_why_conclusions_follow_the_numbers() -> None:
    plan = _plan()
    a = _steps(why(_results(paper=0.40, mean=0.60, gated=0.45), plan,
                   _meta(seen=0.50, unseen=0.10, attention=0.30, prompt=1.0, image=0.10, unseen_loss=5.0)))
    b = _steps(why(_results(paper=0.70, mean=0.50, gated=0.60), plan,
                   _meta(seen=0.12, unseen=0.10, attention=0.95, prompt=0.20, image=0.60, unseen_loss=9.0)))
    assert set(a) == set(b) == {"1", "2", "3", "4", "5", "6"}
    assert all(a[i] != b[i] for i in a)
    # 1. memorised (5× the unseen rate) or not (1.2×)
    assert "has memorised them" in a["1"] and "50 %" in a["1"] and "5.0×" in a["1"]
    assert "**not** memorised" in b["1"] and "12 %" in b["1"]
    # 2. attention on the neighbours vs mean fusion's 10/11
    assert "listens less to its neighbours than mean fusion" in a["2"] and "0.30" in a["2"] and "0.91" in a["2"]
    assert "as much as or more than" in b["2"] and "0.95" in b["2"]
    # 3. which search side knows the class best
    assert "best on the text side" in a["3"] and "text→text (class prompts) 100.0 %" in a["3"]
    assert "best by image→image search, not on the text side" in b["3"] and "image→image 60.0 %" in b["3"]
    # 4. learned minus mean fusion: -20 points on every set, or +20
    assert "**loses**" in a["4"] and a["4"].count("-20.0") == 3
    assert "**beats**" in b["4"] and b["4"].count("+20.0") == 3
    # 5. the option vs the paper recipe; unseen-pairs has no rows and is said to be unmeasured
    assert "1 of 1 improve" in a["5"] and "`gated` +5.0" in a["5"]
    assert "none of the 1 improves" in b["5"] and "`gated` -10.0" in b["5"]
    assert "Not measured on every domain set: `unseen-pairs`" in a["5"]
    # 6. training on unseen pairs: lower loss than the paper recipe, or not
    assert "removes cause 1" in a["6"] and "fits its few pairs instead" in a["6"]
    assert "does not fit its few pairs better" in b["6"]


def test_why_says_when_a_number_is_missing() -> None:
    steps = _steps(why([], _plan(), {}))
    assert set(steps) == {"1", "2", "3", "4", "5", "6"}
    for i in ("1", "2", "3", "4"):
        assert "not measured" in steps[i], steps[i]
    assert "not measured" in steps["5"] and "not run" in steps["6"]
    mixed = _results(paper=0.5, mean=0.5, gated=0.5)
    mixed[0]["value"] = 0.6  # CUB-100: paper better; Flowers-12 and Imagenette: equal (neither better nor worse)
    line = _steps(why([r for r in mixed if r["dataset"] != "imagenette"], _plan(), {}))["4"]
    assert "mixed" in line and "better on CUB-100" in line and "not measured on Imagenette" in line
