"""How tasks are SERVED: backbone, scheduler, batch, sampling and the step loop."""
