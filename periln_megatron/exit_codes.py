"""The trainer's exit statuses, one place for the trainer, periln-launch, the Slurm templates
(slurm/common.sh mirrors them), the demo and the tools.

    0   EXIT_FINISHED     training finished
    2   EXIT_REFUSED      invalid recipe or command line, a checkpoint that cannot be resumed, or the
                          run directory in use by another run: nothing was trained
    3   EXIT_NONFINITE    loss or grad norm became NaN/Inf (no checkpoint of that state is written)
    4   EXIT_SPIKE        a loss spike with stability.on_spike: stop (no checkpoint of that state is written)
    5   EXIT_ROLLBACKS    a spike (or NaN/Inf) needed a rollback after stability.max_rollbacks of them:
                          stopped without saving the spiked state; the newest checkpoint is from before it
    75  EXIT_REQUEUE      stopped by a signal or --exit-after-minutes after saving a checkpoint (EX_TEMPFAIL)
    130 EXIT_INTERRUPTED  a second Ctrl-C: stopped at once without saving (128 + SIGINT)
"""

EXIT_FINISHED = 0
EXIT_REFUSED = 2
EXIT_NONFINITE = 3
EXIT_SPIKE = 4
EXIT_ROLLBACKS = 5
EXIT_REQUEUE = 75
EXIT_INTERRUPTED = 130
