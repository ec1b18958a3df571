"""
permessage-deflate (RFC 7692) passed through, never terminated.

lbws forwards frames verbatim, so compression is the client's and the
backend's business: the client's permessage-deflate offer goes to the
backend as the client wrote it, and the client is accepted with exactly
the backend's answer, parameters included. Compressed frames (RSV1 set on
the first frame of a message) then pass unchanged both ways; lbws never
inflates or deflates. Only permessage-deflate offers are forwarded: lbws
scans frame headers and knows what RSV1 means under permessage-deflate
only, and an extension it cannot scan for could change the framing under
its feet. See "Compression" in the README.
"""

DEFLATE = "permessage-deflate"
HEADER = "sec-websocket-extensions"


def _elements(value):
    """
    The extensions of a C{Sec-WebSocket-Extensions} value, each as written
    (name and parameters), split at the commas that are not inside a
    quoted parameter value.
    """
    elements = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            elements.append(value[start:i])
            start = i + 1
    elements.append(value[start:])
    return [element.strip() for element in elements if element.strip()]


def _name(element):
    return element.split(";", 1)[0].strip().lower()


def forwardedOffer(headers, compression):
    """
    What the backend is offered: the client's permessage-deflate offers,
    each verbatim, in the client's order of preference.

    @param headers: the client's request headers, names in lower case.
    @param compression: the C{compression} setting; C{off} offers nothing.
    @return: a C{Sec-WebSocket-Extensions} value, or None if there is
        nothing to offer.
    """
    if compression == "off":
        return None
    offers = [e for e in _elements(headers.get(HEADER, "")) if _name(e) == DEFLATE]
    return ", ".join(offers) or None


def accepted(headers):
    """
    The backend's C{Sec-WebSocket-Extensions} answer, as the client gets
    it, or None if the backend accepted no extension.

    @param headers: the backend's response headers, names in lower case.
    """
    return headers.get(HEADER, "").strip() or None


def answerIn(head):
    """
    The backend's C{Sec-WebSocket-Extensions} answer in its 101 head (an
    L{lbws.protocol.answers.Head}), as the client gets it, or None.
    """
    values = [value.decode("latin-1").strip() for value in head.values(b"sec-websocket-extensions")]
    return ", ".join(v for v in values if v) or None


def answerProblem(answer, offer):
    """
    What is wrong with the backend's extension answer, or None.

    A backend may accept one of the offers, with parameters of its choice
    (the client, which made the offer, judges them), or none. Anything
    else would leave lbws unable to tell a compressed frame from a bad one.

    @param answer: L{accepted} of the backend's response.
    @param offer: what the backend was offered (L{forwardedOffer}), or None.
    """
    if answer is None:
        return None
    if offer is None:
        return f"backend accepted the extension {answer!r}, which was not offered"
    elements = _elements(answer)
    if len(elements) != 1 or _name(elements[0]) != DEFLATE:
        return f"backend accepted {answer!r}; only one {DEFLATE} was offered"
    return None
