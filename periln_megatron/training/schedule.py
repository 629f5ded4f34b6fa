"""The optimizer's schedule across a resume: refused, kept from the checkpoint, or re-planned.

A checkpoint holds megatron-core's OptimizerParamScheduler state (max/min lr, warmup and decay
lengths, decay style, weight decay, all counted in samples) and the optimizer's param groups
(lr bounds, betas, eps, weight decay). Loaded as they are, they silently replace a recipe's changed
values while the run dir's recipe.yaml, the model card and W&B record the recipe's. Megatron-LM
asserts on such a mismatch unless --use-checkpoint-opt_param-scheduler or
--override-opt_param-scheduler is given; `checkpoint.on_schedule_change` is that choice:

    refuse      (default) one line naming each differing key with both values; nothing is written
    checkpoint  continue the checkpoint's schedule: its values replace the recipe's before anything
                is recorded; a changed train.steps only changes where the run stops (the decay
                length is kept as optim.decay_steps: past it the lr stays at optim.min_lr)
    recipe      re-plan: the recipe's schedule, evaluated at the resumed iteration

Either way, what the recipe records is what trains: after a load the recipe's param-group values
are put back and the scheduler checks (or, for `recipe`, overrides) the checkpoint's values.
"""

from __future__ import annotations

# What the checkpoint's scheduler and param groups hold, as recipe keys. optim.clip_grad is not
# stored: the recipe's always applies. The decay length (optim.decay_steps, else train.steps) is
# compared separately. The scheduler counts samples, so the global batch size is part of it.
SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.warmup_steps", "optim.decay_style", "optim.weight_decay",
                 "optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps", "train.global_batch_size")


def decay_steps(recipe) -> int:
    """Steps the lr decays over (after them it stays at optim.min_lr): optim.decay_steps, else train.steps."""
    return recipe.optim.decay_steps or recipe.train.steps


def _get(recipe, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(recipe, section), key)


def _set(recipe, dotted: str, value) -> None:
    section, key = dotted.split(".")
    setattr(getattr(recipe, section), key, value)


def differences(saved, new) -> list[str]:
    """`key: saved -> new` for each schedule value that differs between two recipes."""
    diffs = [f"{k}: {_get(saved, k)} -> {_get(new, k)}" for k in SCHEDULE_KEYS if _get(saved, k) != _get(new, k)]
    if decay_steps(saved) != decay_steps(new):
        if saved.optim.decay_steps is None and new.optim.decay_steps is None:
            diffs.append(f"train.steps: {saved.train.steps} -> {new.train.steps}")
        else:
            def text(r):
                return str(r.optim.decay_steps) if r.optim.decay_steps else f"{r.train.steps} (train.steps)"
            diffs.append(f"optim.decay_steps: {text(saved)} -> {text(new)}")
    return diffs


def reconcile(saved, recipe, where, world_size: int | None = None, log=print) -> None:
    """Apply recipe.checkpoint.on_schedule_change to a resume of the checkpoint `where`, whose recipe
    is `saved`: raise (refuse), rewrite `recipe` in place with the checkpoint's schedule (checkpoint),
    or keep it (recipe). Before anything is written, so every record shows the values used."""
    from periln_megatron.checkpoint import CheckpointError
    from periln_megatron.config import RecipeError, validate

    diffs = differences(saved, recipe)
    if not diffs:
        return
    policy = recipe.checkpoint.on_schedule_change
    listed = "; ".join(diffs)
    if policy == "refuse":
        raise CheckpointError(
            f"{where} was trained with another schedule ({listed}; checkpoint -> recipe): set "
            f"checkpoint.on_schedule_change=checkpoint to continue the checkpoint's schedule (recorded as such), "
            f"or =recipe to re-plan it with the recipe's values from this iteration")
    if policy == "checkpoint":
        kept_decay = decay_steps(saved)
        for key in SCHEDULE_KEYS:
            _set(recipe, key, _get(saved, key))
        recipe.optim.decay_steps = None if kept_decay == recipe.train.steps else kept_decay
        try:  # e.g. the checkpoint's global batch under this layout
            validate(recipe, world_size, check_environment=False)
        except RecipeError as e:
            raise CheckpointError(f"{where}: its schedule does not fit this run "
                                  f"(checkpoint.on_schedule_change=checkpoint): {e}") from None
        log(f"checkpoint.on_schedule_change=checkpoint: continuing the schedule of {where} ({listed}: "
            f"the checkpoint's values are used and recorded"
            + (f"; optim.decay_steps={kept_decay}" if recipe.optim.decay_steps else "") + ")")
    else:
        log(f"checkpoint.on_schedule_change=recipe: re-planning the schedule of {where} from its iteration "
            f"with the recipe's values ({listed})")


def scheduler_flags(recipe) -> dict:
    """OptimizerParamScheduler's checkpoint flags: megatron-core asserts that the checkpoint's values
    equal ours, unless the recipe is to win (`recipe`)."""
    return {"use_checkpoint_opt_param_scheduler": False,
            "override_opt_param_scheduler": recipe.checkpoint.on_schedule_change == "recipe"}


def group_hyperparameters(optimizer) -> list[dict]:
    """The recipe's values in each param group (lr bounds, betas, eps, weight decay), taken before a load."""
    return [{k: v for k, v in group.items() if k not in ("params", "step")} for group in optimizer.param_groups]


def restore_after_load(optimizer, scheduler, recipe, before: list[dict], iteration: int) -> None:
    """After a checkpoint load: the recipe's param-group values again (the load replaced them with
    the checkpoint's, and the scheduler reads each group's max_lr/min_lr), the scheduler at
    `iteration` of the recipe's schedule for `recipe`, and the lr and weight decay set from them."""
    for group, values in zip(optimizer.param_groups, before):
        group.update(values)
    if recipe.checkpoint.on_schedule_change == "recipe":
        scheduler.num_steps = iteration * recipe.train.global_batch_size
    scheduler.step(increment=0)
