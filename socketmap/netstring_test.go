package socketmap

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

// decoderTests cover every framing rule of SPEC 1.1; they also seed
// FuzzDecoder.
var decoderTests = []struct {
	name string
	in   string
	max  int
	want []string // payloads, in order
	err  error    // what Next returns after them
}{
	{"one", "3:abc,", 10, []string{"abc"}, io.EOF},
	{"empty payload", "0:,", 10, []string{""}, io.EOF},
	{"several", "3:abc,0:,1:x,", 10, []string{"abc", "", "x"}, io.EOF},
	{"payload at max", "10:0123456789,", 10, []string{"0123456789"}, io.EOF},
	{"framing bytes in payload", "5:1:,,x,", 10, []string{"1:,,x"}, io.EOF},
	{"binary payload", "3:\x00\xff\n,", 10, []string{"\x00\xff\n"}, io.EOF},
	{"empty input", "", 10, nil, io.EOF},
	{"leading zero", "01:a,", 10, nil, ErrMalformed},
	{"double zero", "00:,", 10, nil, ErrMalformed},
	{"non-digit length", "a:bc,", 10, nil, ErrMalformed},
	{"plus sign", "+1:a,", 10, nil, ErrMalformed},
	{"minus sign", "-1:a,", 10, nil, ErrMalformed},
	{"space before length", " 1:a,", 10, nil, ErrMalformed},
	{"empty length", ":,", 10, nil, ErrMalformed},
	{"non-digit in length", "1x:a,", 10, nil, ErrMalformed},
	{"missing colon", "3abc,", 10, nil, ErrMalformed},
	{"missing comma", "3:abc3:def,", 10, nil, ErrMalformed},
	{"wrong terminator", "3:abc;", 10, nil, ErrMalformed},
	{"payload longer than length", "2:abc,", 10, nil, ErrMalformed},
	{"length over max", "11:01234567890,", 10, nil, ErrMalformed},
	{"length over max without payload", "99999", 10, nil, ErrMalformed},
	{"huge digit count", strings.Repeat("9", 1000), 10, nil, ErrMalformed},
	{"digit count over cap", "1000000000:", 1 << 40, nil, ErrMalformed},
	{"default max", "10001:", DefaultMaxRequestSize, nil, ErrMalformed},
	{"eof in length", "12", 100, nil, io.ErrUnexpectedEOF},
	{"eof after colon", "3:", 10, nil, io.ErrUnexpectedEOF},
	{"eof in payload", "3:ab", 10, nil, io.ErrUnexpectedEOF},
	{"eof before comma", "3:abc", 10, nil, io.ErrUnexpectedEOF},
	{"valid then malformed", "1:a,x", 10, []string{"a"}, ErrMalformed},
	{"valid then eof", "1:a,2:b", 10, []string{"a"}, io.ErrUnexpectedEOF},
}

func TestDecoderNext(t *testing.T) {
	for _, tt := range decoderTests {
		for _, src := range []struct {
			name string
			wrap func(io.Reader) io.Reader
		}{
			{"whole", func(r io.Reader) io.Reader { return r }},
			{"bytewise", iotest.OneByteReader},
		} {
			t.Run(tt.name+"/"+src.name, func(t *testing.T) {
				d := NewDecoder(bufio.NewReader(src.wrap(strings.NewReader(tt.in))), tt.max)
				var got []string
				var err error
				for {
					var p []byte
					if p, err = d.Next(); err != nil {
						break
					}
					got = append(got, string(p))
				}
				if !equalStrings(got, tt.want) {
					t.Errorf("payloads = %q, want %q", got, tt.want)
				}
				if !errors.Is(err, tt.err) {
					t.Errorf("err = %v, want %v", err, tt.err)
				}
				if n := len(err.Error()); n > 100 {
					t.Errorf("error is %d bytes long, want a short description", n)
				}
			})
		}
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestDecoderBuffered(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"", false},
		{"1", false},
		{"9", false},
		{"3:", false},
		{"3:abc", false},
		{"3:abc,", true},
		{"3:abc,4:", true},
		{"0:,", true},
		{"01", true},     // leading zero: Next fails at once
		{"x", true},      // non-digit
		{"1x", true},     // non-digit after the length
		{":", true},      // empty length
		{"11", true},     // over max
		{"3:abcd", true}, // the terminator is there, and wrong
	}
	for _, tt := range tests {
		br := bufio.NewReader(strings.NewReader(tt.in))
		br.Peek(len(tt.in))
		if got := NewDecoder(br, 10).buffered(); got != tt.want {
			t.Errorf("buffered() with %q buffered = %v, want %v", tt.in, got, tt.want)
		}
	}
}

func TestAppendNetstring(t *testing.T) {
	tests := []struct {
		payload string
		want    string
	}{
		{"", "0:,"},
		{"a", "1:a,"},
		{"policy example.com", "18:policy example.com,"},
		{strings.Repeat("x", 10), "10:xxxxxxxxxx,"},
		{"1:,", "3:1:,,"},
	}
	for _, tt := range tests {
		got := AppendNetstring([]byte("prefix"), []byte(tt.payload))
		if want := "prefix" + tt.want; string(got) != want {
			t.Errorf("AppendNetstring(%q) = %q, want %q", tt.payload, got, want)
		}
		// Round trip through the decoder.
		p, err := NewDecoder(bufio.NewReader(strings.NewReader(tt.want)), 100).Next()
		if err != nil || string(p) != tt.payload {
			t.Errorf("decoding %q = %q, %v; want %q, nil", tt.want, p, err, tt.payload)
		}
	}
}

func TestAppendReply(t *testing.T) {
	tests := []struct {
		reply Reply
		want  string
	}{
		{OK("secure match=.example.net"), "28:OK secure match=.example.net,"},
		{NotFound(), "9:NOTFOUND ,"},
		{Temp("reply too large"), "20:TEMP reply too large,"},
		{Reply{WordTimeout, "slow"}, "12:TIMEOUT slow,"},
		{Reply{WordPerm, "bad"}, "8:PERM bad,"},
		{OK(strings.Repeat("x", 7)), "10:OK xxxxxxx,"},
	}
	for _, tt := range tests {
		if got := AppendReply(nil, tt.reply); string(got) != tt.want {
			t.Errorf("AppendReply(%+v) = %q, want %q", tt.reply, got, tt.want)
		}
		if got, want := tt.reply.encodedLen(), len(tt.want); got != want {
			t.Errorf("encodedLen(%+v) = %d, want %d", tt.reply, got, want)
		}
	}
}

func FuzzDecoder(f *testing.F) {
	for _, tt := range decoderTests {
		f.Add([]byte(tt.in), uint16(min(tt.max, 1<<16-1)))
	}
	f.Fuzz(func(t *testing.T, in []byte, maxSize uint16) {
		src := bytes.NewReader(in)
		br := bufio.NewReaderSize(src, 16)
		d := NewDecoder(br, int(maxSize))
		start := 0
		for {
			buffered, unread := d.buffered(), src.Len()
			p, err := d.Next()
			if buffered && src.Len() != unread {
				t.Fatalf("buffered() = true, but Next read from the source")
			}
			if err != nil {
				if !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrMalformed) {
					t.Fatalf("Next error %v, want io.EOF, io.ErrUnexpectedEOF or ErrMalformed", err)
				}
				return
			}
			if len(p) > int(maxSize) {
				t.Fatalf("payload of %d bytes, max %d", len(p), maxSize)
			}
			end := len(in) - src.Len() - br.Buffered()
			if got := AppendNetstring(nil, p); !bytes.Equal(got, in[start:end]) {
				t.Fatalf("re-encoded %q, consumed %q", got, in[start:end])
			}
			start = end
		}
	})
}

func BenchmarkDecoder(b *testing.B) {
	req := []byte(ns("postfix mail.example.com"))
	d := NewDecoder(bufio.NewReader(&repeatReader{data: req}), DefaultMaxRequestSize)
	b.ReportAllocs()
	b.SetBytes(int64(len(req)))
	for b.Loop() {
		if _, err := d.Next(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendReply(b *testing.B) {
	r := OK("secure match=.example.net:mx1.example.com servername=hostname")
	var buf []byte
	b.ReportAllocs()
	for b.Loop() {
		buf = AppendReply(buf[:0], r)
	}
}

// repeatReader repeats data without end.
type repeatReader struct {
	data []byte
	off  int
}

func (r *repeatReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		m := copy(p[n:], r.data[r.off:])
		n += m
		r.off = (r.off + m) % len(r.data)
	}
	return n, nil
}
