"""When a run counts as diverged: its running loss climbs far above the lowest level it reached.

Two conditions, both needed:
- the running level (an exponential average of the step losses) is above `factor` x its lowest;
- it is above the lowest by more than NOISE_MULT x the step-to-step spread of the loss (a running
  mean absolute deviation of one step's loss from the level), as it was when the lowest was set.

The running level and not one step's loss: with answer-only targets and batches of 8, one batch's
loss swings several-fold, and a single such batch once stopped a healthy run (the tiny main job's D1
at step 82: 1.04 against a lowest level of 0.20). Against the lowest level rather than the current
one, so a loss that ramps up over many steps (which the running level follows) is caught too. A
blow-up to 20x trips it within 5 steps, a loss that stays at 6x within 20.

The ratio alone is the test where losses are of order one, as pretraining losses are. It fails where
the loss nears zero: answer-only losses of small batches are then heavy-tailed (most batches near
0.002, one in four at 0.1-0.2 when it holds an answer the model gets wrong), the running level's
lowest point is a lucky stretch of easy batches, and an ordinary stretch of hard ones is 5-9x it. A
tiny A8a run at 24,000 samples was stopped that way at step 2,247 (running level 0.06 against a
lowest of 0.012), though its val loss was at its best and, let run on, fell from 0.049 to 0.041.
The spread condition asks the climb to be large against that noise too; where the loss is steady
(a spread near zero), it leaves the ratio test as it was.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# The running level: an exponential average over about the last 10 steps. One batch of hard answers
# moves it by a tenth of its loss, so a single bad batch is not a divergence.
LEVEL_DECAY = 0.9
# The spread: mean absolute deviation of a step's loss from the level, over about the last 100 steps
# (a plain mean until then).
SPREAD_WINDOW = 100
# How many spreads the level must climb above its lowest. The level's own noise is ~0.3 spread (an
# average of ~10 steps), so its lucky lowest and unlucky highest lie a few spreads apart: at most 1.6
# over the 3,000 steps of that A8a run.
NOISE_MULT = 5.0


@dataclass
class DivergenceGuard:
    factor: float
    level: float | None = None  # running loss
    floor: float | None = None  # its lowest value so far
    spread: float = 0.0  # step-to-step spread of the loss around the level
    floor_spread: float = 0.0  # the spread when the floor was set
    steps: int = 0  # steps folded into the spread

    def diverged(self, loss: float) -> bool:
        """Folds in one step's loss; True when the run has diverged: a non-finite loss, or a level
        above `limit()` (the level is then the one that passed it, for `describe`)."""
        if not math.isfinite(loss):
            self.level = loss
            return True
        level = loss if self.level is None else LEVEL_DECAY * self.level + (1 - LEVEL_DECAY) * loss
        if level > self.limit():
            self.level = level
            return True
        if self.level is not None:
            self.steps += 1
            self.spread += (abs(loss - self.level) - self.spread) / min(self.steps, SPREAD_WINDOW)
        self.level = level
        if self.floor is None or level < self.floor:
            self.floor, self.floor_spread = level, self.spread
        return False

    def limit(self) -> float:
        """The running level above which the run counts as diverged (inf before the first step)."""
        if self.floor is None:
            return math.inf
        return max(self.factor * self.floor, self.floor + NOISE_MULT * self.floor_spread)

    def describe(self) -> str:
        """Why `diverged` said so."""
        if self.level is None or not math.isfinite(self.level) or self.floor is None:
            return "non-finite loss"
        return (
            f"running level {self.level:.4g} above {self.limit():.4g}: more than {self.factor:g}x its lowest "
            f"({self.floor:.4g}) and more than {NOISE_MULT:g}x the loss's step-to-step spread "
            f"({self.floor_spread:.3g}) above it"
        )

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state.pop("factor")  # the config's, not the run's history
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes a checkpoint's state; one written before the spread existed (keys loss_ema and
        loss_floor) resumes with no spread, i.e. the ratio test alone until the floor moves."""
        if "level" in state:
            for key in self.state_dict():
                setattr(self, key, state[key])
        else:
            self.level, self.floor = state.get("loss_ema"), state.get("loss_floor")
