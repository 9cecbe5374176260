"""The engine loop's Python side: turning the C++ scheduler's steps into model inputs."""

from professional_nano_llm._C import (
    BlockAllocator,
    FinishedSequence,
    ProtocolError,
    ScheduleOutput,
    Scheduler,
    SchedulerConfig,
    StopParams,
)
from professional_nano_llm.engine.batch import Batch

__all__ = [
    "Batch",
    "BlockAllocator",
    "FinishedSequence",
    "ProtocolError",
    "ScheduleOutput",
    "Scheduler",
    "SchedulerConfig",
    "StopParams",
]
