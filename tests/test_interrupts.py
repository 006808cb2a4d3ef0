"""precip_cvae.interrupts: what train and the DDP launcher share to stop early."""

import os
import signal

from precip_cvae import distributed, interrupts, train


def test_the_signal_flag_records_sigusr1_and_restores_the_handler():
    """SLURM's warning (SIGUSR1) inside the block sets the flag instead of killing the process; the handler
    that was there before comes back on exit."""
    before = signal.getsignal(signal.SIGUSR1)
    with interrupts.SignalFlag() as flag:
        assert flag.signum is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


def test_train_and_the_launcher_raise_the_same_exceptions_and_a_rank_reports_them():
    """One definition: the classes train raises are the ones distributed turns rank statuses into."""
    assert train.TrainingInterrupted is interrupts.TrainingInterrupted is distributed.TrainingInterrupted
    assert train.NonFiniteLoss is interrupts.NonFiniteLoss is distributed.NonFiniteLoss
    exc = interrupts.TrainingInterrupted(signal.SIGTERM, "interrupted by signal 15 in epoch 2 step 3")
    assert exc.signum == signal.SIGTERM
    assert distributed._outcome(exc) == ({"outcome": "interrupted", "signum": int(signal.SIGTERM),
                                          "message": "interrupted by signal 15 in epoch 2 step 3"},
                                         distributed.EXIT_INTERRUPTED)
    assert distributed._outcome(interrupts.NonFiniteLoss("epoch 0 step 2"))[0]["outcome"] == "non_finite"
    job = distributed.RankJob("precip_cvae.train:train_process", {"threads": 2}, 2)
    assert job.function() is train.train_process
