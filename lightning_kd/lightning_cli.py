"""Lightning's own ``LightningCLI`` for :class:`~lightning_kd.DistillationModule`: one YAML, no Hydra.

``python -m lightning_kd.lightning_cli fit --config examples/lightning_cli/mnist1d_kd.yaml`` (and
``validate``, ``test``, ``predict``; ``--print_config`` shows every option). The Hydra command
``lightning-kd`` stays the main way to run the teacher -> scratch -> distilled workflow; this one runs
one ``Trainer`` on one module, written the way LightningCLI users write their configs:

.. code-block:: yaml

    model:                        # DistillationModule's arguments
      teacher: {class_path: lightning_kd.models.CNN1D}
      teacher_checkpoint: runs/teacher/checkpoints/last.ckpt   # its weights (weights_only=True)
      student: {class_path: lightning_kd.models.MLP}
      soft_loss: {class_path: lightning_kd.losses.KDLoss, init_args: {temperature: 4.0}}
      optimizer: {class_path: torch.optim.AdamW, init_args: {lr: 0.003}}
    data: {class_path: lightning_kd.data.MNIST1DDataModule}
    trainer:
      callbacks:
        - class_path: lightning_kd.DistillationAnnealing
          init_args: {temperature: {class_path: lightning_kd.schedules.Linear, init_args: {start: 4.0, end: 1.0}}}

Needs ``pip install lightning-kd[cli]`` (jsonargparse).
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_kd.module import DistillationModule


def main(args: ArgsType = None, *, run: bool = True) -> LightningCLI:
    """Run the LightningCLI of :class:`~lightning_kd.DistillationModule` (``args``: None reads ``sys.argv``).

    The model is ``DistillationModule`` itself (not a ``class_path``), so that ``fit --ckpt_path`` merges the
    checkpoint's hyperparameters into the config as LightningCLI does; ``data`` is any ``LightningDataModule``
    (a ``class_path``). LightningCLI's own ``optimizer``/``lr_scheduler`` keys are turned off
    (``auto_configure_optimizers=False``): its ``configure_optimizers`` would hand every parameter, the frozen
    teacher's included, to the optimizer. Give the module's own ``optimizer`` (a class path: the module
    passes it the student's parameters) and ``lr_scheduler`` instead; the CLI refuses the top-level keys.

    Example::

        python -m lightning_kd.lightning_cli fit --config examples/lightning_cli/mnist1d_kd.yaml \\
            --model.teacher_checkpoint=outputs/teacher/<date>/teacher/checkpoints/last.ckpt
    """
    return LightningCLI(
        DistillationModule,
        LightningDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
