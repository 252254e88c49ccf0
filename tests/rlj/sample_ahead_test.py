"""``rlj.sample_ahead.Lookahead``: a batch drawn ahead is returned next and is not saved as consumed."""
from rlj import sample_ahead


class _Counter:
  """Batches 0, 1, 2, ... with an exact position."""

  def __init__(self):
    self.i = 0

  def __next__(self):
    self.i += 1
    return self.i - 1

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


def test_a_peeked_batch_comes_next_and_is_not_consumed():
  it = sample_ahead.wrap(_Counter())
  assert sample_ahead.wrap(it) is it
  assert next(it) == 0
  assert it.peek() == 1 and it.peek() == 1              # drawn once
  assert it.get_state() == {"i": 1}                      # a checkpoint now resumes at batch 1
  assert next(it) == 1 and it.get_state() == {"i": 2}
  assert next(it) == 2
  it.peek()
  it.set_state({"i": 0})                                 # a resume drops the batch drawn ahead
  assert [next(it) for _ in range(3)] == [0, 1, 2]


def test_tracked_batches_count_as_consumed_once_trained():
  """The loop's order with ``train.sample_ahead``: step k takes batch k, peeks k + 1, then finishes step k - 1
  (``trained``) and may checkpoint: the position saved is before batch k, which a resumed run must sample again."""
  it = sample_ahead.wrap(_Counter(), track=True)
  assert next(it) == 0 and it.peek() == 1
  assert it.get_state() == {"i": 0}                      # step 0 not finished
  assert next(it) == 1 and it.peek() == 2
  it.trained()                                           # step 0 finished: a checkpoint resumes at batch 1
  assert it.get_state() == {"i": 1}
  assert next(it) == 2
  it.trained()
  it.trained()                                           # the last step finished, nothing drawn ahead
  assert it.get_state() == {"i": 3}
