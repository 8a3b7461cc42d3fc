#!/usr/bin/python3
"""An SMTP relay for the notifier tests, on Debian's python3-aiosmtpd (`make setup` installs it).

    relay.py PORT CERT KEY USER PASSWORD OUT

Listens on 127.0.0.1:PORT; requires STARTTLS (certificate CERT, key KEY) before anything else
and AUTH (USER, PASSWORD) before MAIL; writes each message it accepts to OUT/<n>.eml as it came,
and to OUT/<n>.txt as a person reads it: the envelope (X-Envelope-*), the decoded From, To and
Subject headers, a blank line and the decoded text. Prints "ready" once it listens and runs until its
standard input closes.
"""
import email
import email.policy
import os
import ssl
import sys

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

port, cert, key, user, password, out = sys.argv[1:]


class Handler:
    def __init__(self):
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        base = os.path.join(out, str(self.count))
        with open(base + ".eml", "wb") as f:
            f.write(envelope.original_content)
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        text = (
            f"X-Envelope-From: {envelope.mail_from}\n"
            f"X-Envelope-To: {','.join(envelope.rcpt_tos)}\n"
            f"X-Authenticated: {session.authenticated}\n"
            f"From: {message['from']}\nTo: {message['to']}\nSubject: {message['subject']}\n\n"
            f"{message.get_content()}"
        )
        with open(base + ".tmp", "w") as f:
            f.write(text)
        os.rename(base + ".tmp", base + ".txt")
        return "250 OK"


def authenticator(server, session, envelope, mechanism, auth_data):
    ok = (
        isinstance(auth_data, LoginPassword)
        and auth_data.login.decode() == user
        and auth_data.password.decode() == password
    )
    return AuthResult(success=ok)


context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
context.load_cert_chain(cert, key)
controller = Controller(
    Handler(),
    hostname="127.0.0.1",
    port=int(port),
    tls_context=context,
    require_starttls=True,
    authenticator=authenticator,
    auth_require_tls=True,
)
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
