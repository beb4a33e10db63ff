"""kubetune's Kubernetes operator: turns TrainingRuns into Jobs running kubetune-train."""
