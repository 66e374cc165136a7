"""The planner: search layouts, verify the best with the compiler, explain, and write a plan."""

from codesign.config import default_workload
from codesign.plan_file import PLAN_SCHEMA, Plan, load_plan
from codesign.planner.entry import plan
from codesign.planner.request import PlanRequest

__all__ = ["PLAN_SCHEMA", "Plan", "PlanRequest", "default_workload", "load_plan", "plan"]
