"""Quality: gold samples and human labels, and statistics that stay valid when the labels are wrong."""
