"""The evaluation JSON: ``{"results": [{dataset, task, metric, mode, value}], memory_size, k, ...}``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas import RefineMode

METRICS = ("top1", "top5", "i2t_r@1", "i2t_r@5", "i2t_r@10", "t2i_r@1", "t2i_r@5", "t2i_r@10")
TASK_ZEROSHOT = "zeroshot"
TASK_RETRIEVAL = "retrieval"


class ResultRow(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str
    task: str
    metric: str
    mode: RefineMode
    value: float = Field(ge=0.0, le=1.0)


class EvalReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    results: list[ResultRow]
    memory_size: int
    k: int
    encoder_id: str
    checkpoint: str | None
    near_duplicates_removed: int

    def value(self, dataset: str, metric: str, mode: RefineMode | str) -> float:
        for row in self.results:
            if row.dataset == dataset and row.metric == metric and row.mode == RefineMode(mode):
                return row.value
        raise KeyError((dataset, metric, str(mode)))

    def to_json_dict(self) -> dict[str, object]:
        return self.model_dump(mode="json")
