"""HiDrop, the method: schedules (presets, validation, FLOPs formula), token selection (scoring,
top-k operators) and the rules that propose a schedule from analysis curves."""
