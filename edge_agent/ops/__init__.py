"""Operations: health snapshots, alarms, retention and the scheduler that runs them."""
