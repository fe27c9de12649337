package main

import (
	"encoding/binary"
	"testing"

	"go.mongodb.org/mongo-driver/x/bsonx/bsoncore"
)

// opMsgOf builds an OP_MSG of the given flags and sections, with its checksum when flagged.
func opMsgOf(flags uint32, sections ...[]byte) []byte {
	message := make([]byte, headerSize+4)
	binary.LittleEndian.PutUint32(message[12:16], opMsg)
	binary.LittleEndian.PutUint32(message[16:20], flags)
	for _, section := range sections {
		message = append(message, section...)
	}
	if flags&checksumPresentBit != 0 {
		message = append(message, 0, 0, 0, 0)
	}
	binary.LittleEndian.PutUint32(message[0:4], uint32(len(message)))
	return message
}

func body(doc bsoncore.Document) []byte {
	return append([]byte{0}, doc...)
}

func documentSequence(identifier string, docs ...bsoncore.Document) []byte {
	payload := append([]byte(identifier), 0)
	for _, doc := range docs {
		payload = append(payload, doc...)
	}
	section := []byte{1, 0, 0, 0, 0}
	binary.LittleEndian.PutUint32(section[1:5], uint32(4+len(payload)))
	return append(section, payload...)
}

func TestParseCommand(t *testing.T) {
	insert := bsoncore.NewDocumentBuilder().
		AppendString("insert", "things").AppendBoolean("ordered", true).AppendString("$db", "probe").Build()
	ping := bsoncore.NewDocumentBuilder().AppendInt32("ping", 1).AppendString("$db", "admin").Build()
	doc := bsoncore.NewDocumentBuilder().AppendString("_id", "a").Build()

	for name, tc := range map[string]struct {
		message []byte
		want    command
	}{
		"body only":                {opMsgOf(0, body(insert)), command{"insert", "things", "probe"}},
		"documents after the body": {opMsgOf(0, body(insert), documentSequence("documents", doc, doc)), command{"insert", "things", "probe"}},
		"documents before the body": {
			opMsgOf(0, documentSequence("documents", doc), body(insert)), command{"insert", "things", "probe"},
		},
		"with a checksum":         {opMsgOf(checksumPresentBit, body(insert)), command{"insert", "things", "probe"}},
		"no collection":           {opMsgOf(0, body(ping)), command{"ping", "", "admin"}},
		"truncated body":          {opMsgOf(0, body(insert)[:10]), command{}},
		"bad sequence size":       {opMsgOf(0, []byte{1, 0xff, 0xff, 0, 0}, body(insert)), command{}},
		"unknown section kind":    {opMsgOf(0, []byte{7}, body(insert)), command{}},
		"not an OP_MSG":           {make([]byte, headerSize+8), command{}},
		"shorter than the header": {[]byte{1, 2, 3}, command{}},
	} {
		if got := parseCommand(tc.message); got != tc.want {
			t.Errorf("%s: parseCommand = %+v, want %+v", name, got, tc.want)
		}
	}
}
