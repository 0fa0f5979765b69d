"""`runyard rotate …`: replace a credential the servers use without restarting them. Each rotation writes
the new credential where the servers read it (a `toolkit.secrets` reference), checks that it works, and
puts everything back as it was when a step fails.
"""
