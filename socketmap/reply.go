package socketmap

import "context"

// Word is a reply's first word (SPEC 1.3). Postfix compares it
// case-sensitively.
type Word string

// The reply words of SPEC 1.3.
const (
	WordOK       Word = "OK"
	WordNotFound Word = "NOTFOUND"
	WordTemp     Word = "TEMP"
	WordTimeout  Word = "TIMEOUT"
	WordPerm     Word = "PERM"
)

// Reply answers one request. It is sent as Word, one space, then Data.
type Reply struct {
	Word Word
	Data string
}

// OK returns a found reply. SPEC 1.3: data must not be empty; the server
// sends an OK with empty data as "TEMP empty reply" and logs an error.
func OK(data string) Reply { return Reply{Word: WordOK, Data: data} }

// NotFound returns the not-found reply, sent as "NOTFOUND " (SPEC 1.3).
func NotFound() Reply { return Reply{Word: WordNotFound} }

// Temp returns a temporary failure, which makes Postfix defer the mail.
// SPEC 1.3: only for internal faults, and reason is short and fixed, never
// raw error text.
func Temp(reason string) Reply { return Reply{Word: WordTemp, Data: reason} }

// A Handler answers one request. name is the map name (the text before the
// request's first space), key the rest. ctx is cancelled when the server is
// closed by force.
type Handler interface {
	ServeSocketmap(ctx context.Context, name, key string) Reply
}

// HandlerFunc adapts a function to a Handler.
type HandlerFunc func(ctx context.Context, name, key string) Reply

// ServeSocketmap calls f(ctx, name, key).
func (f HandlerFunc) ServeSocketmap(ctx context.Context, name, key string) Reply {
	return f(ctx, name, key)
}

var _ Handler = HandlerFunc(nil)
