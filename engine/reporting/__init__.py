"""What a run tells people: report.json (report), report.html (html), engine eval (evaluate), engine export (export)."""
