"""What the API shows of runs and rounds (read side)."""

from __future__ import annotations

from sqlmodel import Session, col, select

from halos_client.event_models import TrackingLinkOut
from halos_client.models import HeadMoveOut, RetentionPolicy, RoundOut, RunOut, RunSummary
from server.models import HeadMove, Job, JobStatus, Round, Run, TrackingLink


def status_text(job: Job | None) -> str:
    if job is None:
        return "unknown"
    return job.status.value if isinstance(job.status, JobStatus) else str(job.status)


def round_views(session: Session, rounds: list[Round]) -> list[RoundOut]:
    """Views of `rounds` (include a round's parent round to show a waiting round's parent checkpoint)."""
    if not rounds:
        return []
    jobs = {j.id: j for j in session.exec(select(Job).where(col(Job.id).in_([r.job_id for r in rounds]))).all()}
    by_id = {r.id: r for r in rounds}
    out = []
    for r in rounds:
        job = jobs.get(r.job_id)
        parent_round = by_id.get(r.parent_round_id) if r.parent_round_id else None
        # set when the round was created from a finished parent, or when its parent succeeded
        parent_ckpt = r.parent_checkpoint_id or (parent_round.checkpoint_id if parent_round else None)
        out.append(
            RoundOut(
                index=r.index,
                round_id=r.id,
                run_id=r.run_id,
                job_id=r.job_id,
                status=status_text(job),
                parent_checkpoint_id=parent_ckpt,
                parent_job_id=job.parent_job_id if job else None,
                checkpoint_id=r.checkpoint_id,
                feedback_ids=list(r.feedback_ids or []),
                loss=dict(r.loss or {}),
                hyperparams=dict(r.hyperparams or {}),
                conversion=r.conversion,
                gate=r.gate,
                promoted=r.promoted,
                promotion=r.promotion,
                created_at=r.created_at,
            )
        )
    return out


def round_view(session: Session, rnd: Round) -> RoundOut:
    rounds = [rnd]
    if rnd.parent_round_id:
        parent = session.get(Round, rnd.parent_round_id)
        if parent is not None:
            rounds.insert(0, parent)
    return round_views(session, rounds)[-1]


def run_view(session: Session, run: Run) -> RunOut:
    rounds = list(session.exec(select(Round).where(Round.run_id == run.id).order_by(col(Round.index))).all())
    return RunOut(
        id=run.id,
        name=run.name,
        model_id=run.model_id,
        loss=dict(run.loss or {}),
        hyperparams=dict(run.hyperparams or {}),
        conversion=run.conversion,
        lora=run.lora,
        head_checkpoint_id=run.head_checkpoint_id,
        head_history=[
            HeadMoveOut(
                from_checkpoint_id=m.from_checkpoint_id,
                to_checkpoint_id=m.to_checkpoint_id,
                reason=m.reason,
                round_id=m.round_id,
                created_at=m.created_at,
            )
            for m in session.exec(select(HeadMove).where(HeadMove.run_id == run.id).order_by(col(HeadMove.id))).all()
        ],
        created_at=run.created_at,
        rounds=round_views(session, rounds),
        retention=RetentionPolicy.model_validate(run.retention) if run.retention else None,
        tracking=[
            TrackingLinkOut(
                backend=t.backend,
                tracking_run_id=t.tracking_run_id,
                exported_steps={k: int(v) for k, v in ((t.exported or {}).get("steps") or {}).items()},
                last_error=t.last_error,
            )
            for t in session.exec(
                select(TrackingLink).where(TrackingLink.run_id == run.id).order_by(col(TrackingLink.backend))
            ).all()
        ],
    )


def run_summary(run: Run) -> RunSummary:
    return RunSummary(
        id=run.id, name=run.name, model_id=run.model_id, loss=dict(run.loss or {}), created_at=run.created_at
    )
