"""The README's three open questions, measured (`python -m bench.questions`), one module a
job: the plan (`plan`), the wire counter (`wire`), the scratch database and where it ran
(`_db`), the figures (`figures`), one module per question (`pool`, `loading`,
`migrations`), the tables of bench/QUESTIONS.md (`tables`) and the command (`__main__`)."""
