package socketmap

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// ErrMalformed reports input that breaks the netstring rules of SPEC 1.1.
// Errors wrapping it carry a short description, never the payload.
var ErrMalformed = errors.New("socketmap: malformed netstring")

// maxLengthDigits caps a length prefix whatever the size limit, so the
// length can neither overflow nor be padded out without end.
const maxLengthDigits = 9

// A Decoder reads netstrings (SPEC 1.1) from a buffered reader, refusing
// any longer than a maximum payload size.
type Decoder struct {
	r   *bufio.Reader
	max int
	buf []byte // payload and comma of the last netstring, reused
}

// NewDecoder returns a Decoder reading from r that refuses payloads longer
// than maxSize bytes.
func NewDecoder(r *bufio.Reader, maxSize int) *Decoder {
	return &Decoder{r: r, max: min(max(maxSize, 0), 999_999_999)}
}

// Next returns the payload of the next netstring. The payload is valid until
// the next call. A clean end of input before a netstring returns io.EOF, an
// end inside one io.ErrUnexpectedEOF, and broken framing an error wrapping
// ErrMalformed.
func (d *Decoder) Next() ([]byte, error) {
	n, err := d.readLength()
	if err != nil {
		return nil, err
	}
	buf, err := d.readPayload(n + 1)
	if err != nil {
		return nil, unexpected(err)
	}
	if buf[n] != ',' {
		// SPEC 1.1: exactly length bytes, then a comma.
		return nil, fmt.Errorf("%w: %q after payload, want ','", ErrMalformed, buf[n])
	}
	return buf[:n], nil
}

// readLength reads the length prefix and its colon.
func (d *Decoder) readLength() (int, error) {
	n, digits := 0, 0
	for {
		c, err := d.r.ReadByte()
		if err != nil {
			if digits == 0 && err == io.EOF {
				return 0, io.EOF
			}
			return 0, unexpected(err)
		}
		switch {
		case c == ':' && digits > 0:
			return n, nil
		case c < '0' || c > '9':
			// SPEC 1.1: the length is ASCII decimal digits.
			if digits == 0 {
				return 0, fmt.Errorf("%w: length starts with %q", ErrMalformed, c)
			}
			return 0, fmt.Errorf("%w: %q after length, want ':'", ErrMalformed, c)
		case digits == 1 && n == 0:
			// SPEC 1.1: no leading zero ("0:," is the only length starting with 0).
			return 0, fmt.Errorf("%w: leading zero in length", ErrMalformed)
		}
		n = n*10 + int(c-'0')
		digits++
		// SPEC 1.1: refuse an oversized request from its length alone,
		// before reading (or buffering) any of it.
		if n > d.max || digits > maxLengthDigits {
			return 0, fmt.Errorf("%w: length over %d", ErrMalformed, d.max)
		}
	}
}

// readPayload reads the n bytes after the colon into d.buf. The length
// was checked against the limit (SPEC 1.1), but a client may still announce
// the limit and send nothing: the buffer grows with the bytes that arrive,
// by at most a read buffer or a doubling at a time, never by the declared
// length alone, so that announcing MaxRequestSize on every connection does
// not reserve it.
func (d *Decoder) readPayload(n int) ([]byte, error) {
	buf := d.buf[:0]
	for len(buf) < n {
		if len(buf) == cap(buf) {
			grown := make([]byte, len(buf), min(n, max(2*len(buf), d.r.Size())))
			copy(grown, buf)
			buf = grown
		}
		m, err := d.r.Read(buf[len(buf):min(cap(buf), n)])
		buf = buf[:len(buf)+m]
		if err != nil {
			d.buf = buf
			return nil, err
		}
	}
	d.buf = buf
	return buf, nil
}

// buffered reports whether Next can return without reading from the
// underlying reader: a whole netstring, or enough of one to see that it is
// malformed, is already buffered. It mirrors readLength.
func (d *Decoder) buffered() bool {
	b, _ := d.r.Peek(d.r.Buffered())
	n := 0
	for i, c := range b {
		switch {
		case c == ':' && i > 0:
			return len(b) >= i+1+n+1
		case c < '0' || c > '9', i == 1 && n == 0:
			return true
		}
		n = n*10 + int(c-'0')
		if n > d.max || i+1 > maxLengthDigits {
			return true
		}
	}
	return false
}

func unexpected(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// AppendNetstring appends payload encoded as a netstring to dst.
func AppendNetstring(dst, payload []byte) []byte {
	dst = strconv.AppendInt(dst, int64(len(payload)), 10)
	dst = append(dst, ':')
	dst = append(dst, payload...)
	return append(dst, ',')
}

// AppendReply appends r encoded as one netstring, "<word> <data>"
// (SPEC 1.3), to dst.
func AppendReply(dst []byte, r Reply) []byte {
	dst = strconv.AppendInt(dst, int64(r.payloadLen()), 10)
	dst = append(dst, ':')
	dst = append(dst, r.Word...)
	dst = append(dst, ' ')
	dst = append(dst, r.Data...)
	return append(dst, ',')
}

func (r Reply) payloadLen() int { return len(r.Word) + 1 + len(r.Data) }

// encodedLen is the length of r as AppendReply encodes it.
func (r Reply) encodedLen() int {
	n := r.payloadLen()
	digits := 1
	for m := n; m >= 10; m /= 10 {
		digits++
	}
	return digits + 1 + n + 1
}
