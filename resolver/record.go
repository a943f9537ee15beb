package resolver

import (
	"fmt"
	"strconv"
	"strings"
)

// The _mta-sts TXT record (RFC 8461 §3.1, SPEC 3.2 and 3.3):
//
//	sts-text-record = sts-version 1*(sts-sep sts-field) [sts-sep]
//	sts-field       = sts-id / sts-extension
//	sts-version     = %s"v=STSv1"
//	sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
//	sts-sep         = *WSP %x3B *WSP                 ; ";"
//	sts-extension   = sts-ext-name "=" sts-ext-value
//	sts-ext-name    = (ALPHA / DIGIT) 0*31(ALPHA / DIGIT / "_" / "-" / ".")
//	sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)   ; VCHAR except "=" and ";"
//
// Choices where the RFC leaves room, each applied at the line below that
// implements it:
//   - A repeated field: the first occurrence counts (SPEC 3.3). The first
//     "id" must be a valid sts-id; a later "id" is not an id any more and
//     only has to match the generic sts-extension syntax, so
//     "id=a; id=b-c" is valid with ID "a", while "id=a-b; id=c" is invalid.
//   - An empty field ("v=STSv1;; id=1", "id=1;;"): invalid. The ABNF puts
//     exactly one field between two separators and allows one trailing
//     separator only.
//   - Trailing WSP without a trailing ";" ("v=STSv1; id=1 "): accepted. The
//     ABNF only allows it after a ";", but rejecting the record would turn
//     off the domain's policy over invisible whitespace; accepting it adds
//     no ambiguity.
//   - Names are case-sensitive (%s in the ABNF): "ID=1" is an extension,
//     so a record with only "ID=1" has no id and is invalid.

// stsVersion starts every STSv1 record (RFC 8461 §3.1 sts-version).
const stsVersion = "v=STSv1"

// maxIDLen is the longest policy id (RFC 8461 §3.1 sts-id, SPEC 3.3).
const maxIDLen = 32

// maxExtNameLen is the longest extension field name (RFC 8461 §3.1
// sts-ext-name: one character plus up to 31).
const maxExtNameLen = 32

// IsCandidate reports whether a TXT string is an STSv1 record candidate: it
// starts with "v=STSv1" followed by optional WSP and then ";" or the end of
// the string (SPEC 3.2, RFC 8461 §3.1 "Records that do not begin with
// v=STSv1; are discarded"). "v=STSv10;" is not a candidate.
func IsCandidate(txt string) bool {
	if !strings.HasPrefix(txt, stsVersion) {
		return false
	}
	i := recordSkipWSP(txt, len(stsVersion))
	return i == len(txt) || txt[i] == ';'
}

// SelectRecord applies SPEC 3.2 to all TXT strings of the _mta-sts name:
// only candidates count (IsCandidate); none is ErrNoRecord; more than one is
// ErrInvalidRecord, even when all of them are valid (RFC 8461 §3.1: "If the
// number of resulting records is not one ... senders MUST assume the
// recipient domain does not have an available MTA-STS policy"); exactly one
// is parsed with ParseRecord.
func SelectRecord(txts []string) (Record, error) {
	var found string
	n := 0
	for _, txt := range txts {
		if IsCandidate(txt) {
			found = txt
			n++
		}
	}
	switch {
	case n == 0:
		return Record{}, fmt.Errorf("%w: no STSv1 record among %d TXT records", ErrNoRecord, len(txts))
	case n > 1:
		// SPEC 3.2: two valid records mean no policy.
		return Record{}, fmt.Errorf("%w: %d STSv1 records, want exactly one", ErrInvalidRecord, n)
	}
	return ParseRecord(found)
}

// ParseRecord parses one STSv1 TXT record, the strings of the TXT RR already
// joined (SPEC 3.1, 3.3; RFC 8461 §3.1). The error wraps ErrInvalidRecord
// and quotes at most a short, escaped piece of txt (SPEC 8.3). The returned
// ID is a substring of txt.
func ParseRecord(txt string) (Record, error) {
	// RFC 8461 §3.1: the record starts with sts-version, case-sensitive.
	if !strings.HasPrefix(txt, stsVersion) {
		return Record{}, recordError(txt, 0, "does not start with v=STSv1")
	}
	var id string
	seenID := false
	i := len(stsVersion)
	for {
		// sts-sep, or the end of the record.
		j := recordSkipWSP(txt, i)
		if j == len(txt) {
			// End of record. j > i means trailing WSP without ";":
			// accepted, see the choices above.
			break
		}
		if txt[j] != ';' {
			return Record{}, recordError(txt, j, `expected ";"`)
		}
		j = recordSkipWSP(txt, j+1)
		if j == len(txt) {
			// [sts-sep]: one optional trailing separator.
			break
		}

		// sts-field: name "=" value, no WSP around "=" (SPEC 3.3).
		nameEnd := j
		for nameEnd < len(txt) && isExtNameChar(txt[nameEnd]) {
			nameEnd++
		}
		name := txt[j:nameEnd]
		switch {
		case name == "":
			// Covers ";;" (an empty field, invalid per the ABNF) and
			// any field starting with a character no name can start with.
			return Record{}, recordError(txt, j, "expected a field name")
		case !isAlnum(name[0]):
			// RFC 8461 §3.1 sts-ext-name starts with ALPHA / DIGIT.
			return Record{}, recordError(txt, j, "field name must start with a letter or digit")
		case len(name) > maxExtNameLen:
			return Record{}, recordError(txt, j, "field name longer than 32 characters")
		}
		if nameEnd == len(txt) || txt[nameEnd] != '=' {
			return Record{}, recordError(txt, nameEnd, `expected "=" after field name`)
		}
		valueStart := nameEnd + 1
		valueEnd := valueStart
		for valueEnd < len(txt) && recordIsValueChar(txt[valueEnd]) {
			valueEnd++
		}
		value := txt[valueStart:valueEnd]
		if value == "" {
			// RFC 8461 §3.1: sts-id and sts-ext-value are 1* both.
			return Record{}, recordError(txt, valueStart, "empty field value")
		}

		if name == "id" && !seenID {
			// SPEC 3.3: the first id counts and must be 1 to 32
			// letters or digits (RFC 8461 §3.1 sts-id).
			if !recordIsID(value) {
				return Record{}, recordError(txt, valueStart, "id must be 1 to 32 letters or digits")
			}
			id = value
			seenID = true
		}
		// Extensions, and repeats of a field already seen, are ignored
		// once they match sts-extension (RFC 8461 §3.1, SPEC 3.3).
		i = valueEnd
	}
	if !seenID {
		// RFC 8461 §3.1: id is required.
		return Record{}, recordError(txt, len(txt), "missing id")
	}
	return Record{ID: id}, nil
}

// recordError builds a ParseRecord error: the reason, the byte offset and a
// short quote of the text at the offset (SPEC 8.3 bounds remote text).
func recordError(txt string, offset int, reason string) error {
	if offset >= len(txt) {
		return fmt.Errorf("%w: %s at end of record", ErrInvalidRecord, reason)
	}
	return fmt.Errorf("%w: %s at offset %d near %s", ErrInvalidRecord, reason, offset, clipQuote(txt[offset:], 24))
}

// clipQuote returns s quoted with strconv.QuoteToASCII, cut to at most n
// bytes of s first (with "..." appended when cut), so that a remote string
// in an error or log stays short (SPEC 8.3): at most 4n+5 bytes.
func clipQuote(s string, n int) string {
	if len(s) <= n {
		return strconv.QuoteToASCII(s)
	}
	return strconv.QuoteToASCII(s[:n]) + "..."
}

// recordSkipWSP returns the index of the first byte at or after i that is
// not WSP (SP or HTAB, RFC 5234).
func recordSkipWSP(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
		i++
	}
	return i
}

// isAlnum reports whether c is an ASCII letter or digit (ALPHA / DIGIT,
// RFC 5234), for the record and policy grammars alike.
func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// isExtNameChar: RFC 8461 §3.1 sts-ext-name after its first character, the
// same set as §3.2 sts-policy-ext-name.
func isExtNameChar(c byte) bool {
	return isAlnum(c) || c == '_' || c == '-' || c == '.'
}

// recordIsValueChar: RFC 8461 §3.1 sts-ext-value, %x21-3A / %x3C / %x3E-7E.
func recordIsValueChar(c byte) bool {
	return c >= 0x21 && c <= 0x7e && c != '=' && c != ';'
}

// recordIsID: RFC 8461 §3.1 sts-id value, 1*32(ALPHA / DIGIT).
func recordIsID(s string) bool {
	if len(s) == 0 || len(s) > maxIDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) {
			return false
		}
	}
	return true
}
