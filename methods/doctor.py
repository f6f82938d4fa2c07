"""``ovss doctor``: the environment report of ``featurestore.doctor`` plus what the methods
layer adds (whether the scoring kernel is compiled here)."""

from __future__ import annotations


def doctor_report(store_path: str | None = None) -> dict:
    """``featurestore.doctor.doctor_report`` with a ``scoring kernel`` entry: ``compiled (...)``,
    or why the slower torch path runs (same labels)."""
    from featurestore.doctor import doctor_report as environment_report
    from methods.scoring import kernel_status

    report = environment_report(store_path)
    report["scoring kernel"] = kernel_status()
    return report
