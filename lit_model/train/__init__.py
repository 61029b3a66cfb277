"""The fine-tuning run: arguments and job (args.py), building (setup.py), the loop (loop.py), evaluation
(evaluate.py), DropBP calibration (calibrate.py), state and checkpoints (state.py, checkpoints.py), several processes
(dist.py) and the run itself (run.py). Scripts call `run(job)`."""

from lit_model.train.args import BAdamArgs, DataArgs, DropBPArgs, EvalArgs, FinetuneJob, TrainArgs
from lit_model.train.run import run

__all__ = ["BAdamArgs", "DataArgs", "DropBPArgs", "EvalArgs", "FinetuneJob", "TrainArgs", "run"]
