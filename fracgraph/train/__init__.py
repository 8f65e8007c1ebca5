"""Training building blocks that do not depend on ORT artifacts: data, schedules, run IO."""
